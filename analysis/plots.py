"""PNG plots beside a store: where they go, the headless pyplot, and the outlier analysis's plots
(max |x| per dimension per layer, and the outlier dimensions' value distributions: values with
|x| >= the magnitude threshold, from the pass's histograms). The circuit analyses draw their own
figures in their modules with :func:`pyplot` and :func:`figure_path`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported only when plotting."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_path(store: str | Path, suffix: str) -> Path:
    """PNGs go beside the store: ``job.zarr`` -> ``job.{suffix}.png`` in the same directory."""
    store = Path(store)
    return store.with_name(f"{store.stem}.{suffix}.png")


def save_plots(rep, folder: str | Path) -> list[Path]:
    from matplotlib.colors import LogNorm

    plt = pyplot()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    r = rep.report
    alpha = r["params"]["magnitude"]
    layers = rep.arrays["layers"][0]
    max_abs = rep.arrays["max_abs"][0]
    outliers = rep.arrays["outlier_dims"][0]
    saved = []

    fig, ax = plt.subplots(figsize=(min(16, 4 + max_abs.shape[1] / 64), min(10, 2 + len(layers) / 4)))
    data = np.fmax(max_abs, 1e-3)  # NaN (no finite value) stays NaN: drawn blank, not as a small value
    finite = data[np.isfinite(data)]
    norm = LogNorm(vmin=max(finite.min(initial=1.0), 1e-3), vmax=max(finite.max(initial=alpha), alpha))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis",
                   extent=(-0.5, data.shape[1] - 0.5, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(x) for x in layers], fontsize=6 if len(layers) > 24 else 8)
    ax.set_xlabel("dimension")
    ax.set_ylabel("layer")
    ax.set_title(f"max |x| per dimension and layer, hidden states feeding linear layers\n"
                 f"{len(outliers)} outlier dimension(s) marked in red", fontsize=10)
    for dim in outliers:
        ax.axvline(dim, color="red", lw=0.6, alpha=0.7)
    fig.colorbar(im, ax=ax, label="max |x|")
    fig.tight_layout()
    path = folder / "outliers_max_abs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    saved.append(path)

    dims = rep.arrays["hist_dims"][0]
    counts = rep.arrays["hist_counts"][0]
    sums = rep.arrays["hist_sums"][0]
    if counts.sum():
        show = [i for i in range(len(dims)) if counts[i].sum()][:8]
        fig, axes = plt.subplots(len(show), 1, figsize=(8, 1.8 * len(show) + 0.6), squeeze=False)
        by_dim = {o["dim"]: o for o in r["outlier_dims"]}
        for ax, i in zip(axes[:, 0], show):
            c = counts[i]
            nz = np.flatnonzero(c)
            centres = sums[i][nz] / c[nz]
            ax.bar(centres, c[nz], width=np.maximum(np.abs(centres) * 0.012, 1e-3), color="tab:blue")
            o = by_dim.get(int(dims[i]))
            title = f"dim {dims[i]}: {int(c.sum()):,} values with |x| >= {alpha:g}"
            if o:
                title += f" (outlier; quartiles {', '.join(f'{q:.3g}' for q in o['quartiles'])})"
                for q in o["quartiles"]:
                    ax.axvline(q, color="red", lw=0.8, ls="--")
            else:
                title += " (not an outlier: largest max |x|)"
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("count", fontsize=8)
        axes[-1, 0].set_xlabel("value")
        fig.tight_layout()
        path = folder / "outliers_values.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        saved.append(path)
    return saved
