"""The maths of the Fourier analysis: spectra, helix fits and regressions (NumPy, small matrices).

Kept apart from the store-reading and reporting in :mod:`analysis.fourier`: every function here
takes per-layer arrays (means over prompts, regression sums) and knows nothing of stores or Dask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def spectrum(h: np.ndarray) -> np.ndarray:
    """Power per frequency k = 0..N//2 of activations h (N numbers, d dims): centred, mean over dims."""
    h = np.asarray(h, dtype=np.float64)
    coeffs = np.fft.rfft(h - h.mean(axis=0), axis=0)
    return (np.abs(coeffs) ** 2).mean(axis=1)


def top_periods(power: np.ndarray, n: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` strongest frequencies k ≥ 1 as (periods N/k, share of the non-DC power)."""
    k = np.argsort(power[1:], kind="stable")[::-1][:count] + 1
    total = power[1:].sum()
    return n / k, power[k] / total if total > 0 else np.zeros(len(k))


def helix_features(values: np.ndarray, periods, linear: bool = True, scale: float | None = None) -> np.ndarray:
    """``[cos(2πa/T), sin(2πa/T) for T] + [a / max a] + [1]`` (no linear column when ``linear=False``)."""
    a = np.asarray(values, dtype=np.float64)
    cols = []
    for t in periods:
        cols += [np.cos(2 * np.pi * a / t), np.sin(2 * np.pi * a / t)]
    if linear:
        cols.append(a / (scale if scale else max(float(np.abs(a).max()), 1.0)))
    cols.append(np.ones_like(a))
    return np.stack(cols, axis=1)


def poly_features(values: np.ndarray, degree: int = 3, scale: float | None = None) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64) / (scale if scale else max(float(np.abs(values).max()), 1.0))
    return np.stack([x ** p for p in range(degree + 1)], axis=1)


def r_squared(features: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, int]:
    """R² of the least-squares fit of centred ``y`` on ``features`` (rank-tolerant), coefficients, rank."""
    coef, _, rank, _ = np.linalg.lstsq(features, y, rcond=1e-10)
    resid = y - features @ coef
    total = float((y ** 2).sum())
    return (1.0 - float((resid ** 2).sum()) / total if total > 0 else float("nan")), coef, int(rank)


def pca(h: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (N, r), components (r, d), explained variance (all) of the centred activations."""
    hc = np.asarray(h, dtype=np.float64) - np.asarray(h, dtype=np.float64).mean(axis=0)
    u, s, vt = np.linalg.svd(hc, full_matrices=False)
    r = min(n_components, len(s))
    return u[:, :r] * s[:r], vt[:r], s ** 2


@dataclass
class HelixFit:
    periods: list[float]
    r2: dict[str, float]  #: helix and each baseline
    n_params: dict[str, int]  #: rank of each fit's design (the pca "fit" has r components)
    directions: np.ndarray  #: (feature, d_model): each helix feature's direction in the activation space
    n_components: int
    #: the strongest period's plane: its period and every number's coordinates in it (N, 2)
    plane_period: float = float("nan")
    plane: np.ndarray | None = None


def helix_fit(values: np.ndarray, h: np.ndarray, periods, *, n_components: int = 100, n_shuffles: int = 20,
              seed: int = 0, n_auto: int = 4) -> HelixFit:
    """Fit the helix and its baselines to activations ``h`` (N, d) of numbers ``values``.

    ``periods``: a list, or ``"auto"`` for the ``n_auto`` strongest periods of ``h``'s own spectrum
    (values must then be a contiguous range in order).
    """
    values = np.asarray(values, dtype=np.float64)
    scores, components, eig = pca(h, n_components)
    scale = max(float(np.abs(values).max()), 1.0)

    def pick(v: np.ndarray, y: np.ndarray) -> list[float]:
        if isinstance(periods, str):
            order = np.argsort(v)
            return [float(p) for p in top_periods(spectrum(y[order]), len(v), n_auto)[0]]
        return [float(p) for p in periods]

    chosen = pick(values, scores)
    helix_x = helix_features(values, chosen, scale=scale)
    r2, n_params = {}, {}
    r2["helix"], coef, n_params["helix"] = r_squared(helix_x, scores)
    r2["circle"], _, n_params["circle"] = r_squared(helix_features(values, chosen, linear=False, scale=scale), scores)
    r2["poly3"], _, n_params["poly3"] = r_squared(poly_features(values, 3, scale), scores)
    rank = n_params["helix"] - 1  # the constant explains nothing of centred data
    r2["pca"] = float(eig[:rank].sum() / eig.sum()) if eig.sum() > 0 else float("nan")
    n_params["pca"] = rank
    rng = np.random.default_rng(seed)
    shuffled = []
    for _ in range(n_shuffles):
        perm = rng.permutation(len(values))
        shuffled_values = values[perm]
        features = helix_features(shuffled_values, pick(shuffled_values, scores), scale=scale)
        shuffled.append(r_squared(features, scores)[0])
    r2["shuffled"] = float(np.mean(shuffled)) if shuffled else float("nan")
    n_params["shuffled"] = n_params["helix"]
    directions = coef @ components
    # the number tokens in the plane of the period contributing most variance to the fit: their
    # coordinates along that period's cos/sin features, with the other features accounted for
    contribution = [np.linalg.norm(helix_x[:, 2 * i:2 * i + 2] @ coef[2 * i:2 * i + 2]) for i in range(len(chosen))]
    j = int(np.argmax(contribution))
    hc = np.asarray(h, dtype=np.float64) - np.asarray(h, dtype=np.float64).mean(axis=0)
    plane = (hc @ np.linalg.pinv(directions[:-1], rcond=1e-10))[:, 2 * j:2 * j + 2]
    return HelixFit(chosen, r2, n_params, directions, scores.shape[1], chosen[j], plane)


@dataclass
class Regression:
    """Sufficient statistics of activations X (n, d) against features G (n, p), mergeable."""

    n: int
    sum_x: np.ndarray  # (d,)
    sum_sq: float
    sum_g: np.ndarray  # (p,)
    gtg: np.ndarray  # (p, p)
    gtx: np.ndarray  # (p, d)
    nonfinite: int = 0  #: NaN/inf values in the rows read; their rows are left out of every sum
    rows_left_out: int = 0

    def fit(self, cols: list[int]) -> tuple[float, np.ndarray]:
        """Fraction of variance of X explained by features ``cols`` (plus intercept), and their directions."""
        cols = list(cols)
        if self.n == 0:  # no row with finite values: nothing to fit (NaN, never 0)
            return float("nan"), np.zeros((len(cols), self.sum_x.shape[0]))
        mean_x, mean_g = self.sum_x / self.n, self.sum_g[cols] / self.n
        gcg = self.gtg[np.ix_(cols, cols)] - self.n * np.outer(mean_g, mean_g)
        gcx = self.gtx[cols] - self.n * np.outer(mean_g, mean_x)
        w = np.linalg.pinv(gcg, rcond=1e-10) @ gcx
        total = self.sum_sq - self.n * float(mean_x @ mean_x)
        explained = float((w * gcx).sum())
        if total <= 1e-12 * max(self.sum_sq, 1e-300):  # a constant activation (e.g. the embedding of '=')
            return float("nan"), np.zeros_like(w)
        return explained / total, w


def period_features(values: np.ndarray, periods) -> np.ndarray:
    """``[cos, sin](2π v / T)`` for each T, then v itself (the linear reference): (n, 2·len(periods) + 1)."""
    v = np.asarray(values, dtype=np.float64)
    cols = []
    for t in periods:
        cols += [np.cos(2 * np.pi * v / t), np.sin(2 * np.pi * v / t)]
    cols.append(v)
    return np.stack(cols, axis=1)
