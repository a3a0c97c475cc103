"""Position, head and neuron selections give exactly the right rows and columns; no padding."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from harvest.runner import run

HOOKS = ["blocks.{1..2}.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.2.mlp.hook_post"]


@pytest.fixture
def full(neox_ckpt, make_spec, tmp_path):
    """Everything, every position: the reference the selections are cut from."""
    spec = make_spec(neox_ckpt, hooks=HOOKS, store={"path": "full.zarr"})
    return zarr.open_group(str(run(spec, progress=False).path), mode="r")


def harvest(neox_ckpt, make_spec, name, **capture):
    spec = make_spec(neox_ckpt, hooks=HOOKS, capture=capture, store={"path": f"{name}.zarr"})
    return zarr.open_group(str(run(spec, progress=False).path), mode="r")


def expected_rows(full, keep) -> np.ndarray:
    """Row indices of the full store whose (seq, pos) pass ``keep(pos, length)``."""
    seq, pos, lengths = full["seq"][...], full["pos"][...], full["seq_length"][...]
    return np.flatnonzero([keep(p, lengths[s]) for s, p in zip(seq, pos)])


@pytest.mark.parametrize("positions,keep", [
    ("last", lambda p, n: p == n - 1),
    ({"every": 3, "offset": 1}, lambda p, n: p % 3 == 1),
    ([0, -2], lambda p, n: p in (0, n - 2)),
])
def test_positions(full, neox_ckpt, make_spec, positions, keep):
    g = harvest(neox_ckpt, make_spec, "sel", positions=positions)
    rows = expected_rows(full, keep)
    assert g["seq"].shape[0] == len(rows)
    np.testing.assert_array_equal(g["seq"][...], full["seq"][...][rows])
    np.testing.assert_array_equal(g["pos"][...], full["pos"][...][rows])
    np.testing.assert_array_equal(g["tokens"][...], full["tokens"][...][rows])
    for name in ("blocks.1.hook_resid_post", "blocks.2.mlp.hook_post", "blocks.1.attn.hook_z"):
        np.testing.assert_allclose(g[name][...], full[name][...][rows], atol=1e-5)


def test_seeded_sample_is_reproducible_and_within_sequences(full, neox_ckpt, make_spec):
    a = harvest(neox_ckpt, make_spec, "a", positions={"sample": 5, "seed": 7})
    b = harvest(neox_ckpt, make_spec, "b", positions={"sample": 5, "seed": 7})
    c = harvest(neox_ckpt, make_spec, "c", positions={"sample": 5, "seed": 8})
    np.testing.assert_array_equal(a["pos"][...], b["pos"][...])
    assert not np.array_equal(a["pos"][...], c["pos"][...])
    lengths = full["seq_length"][...]
    counts = np.bincount(a["seq"][...], minlength=len(lengths))
    np.testing.assert_array_equal(counts, np.minimum(5, lengths))
    assert (a["pos"][...] < lengths[a["seq"][...]]).all()


def test_heads_and_neurons(full, neox_ckpt, make_spec):
    g = harvest(neox_ckpt, make_spec, "hn", heads=[1, 3], neurons=[0, 5, 7, 200])
    np.testing.assert_allclose(g["blocks.1.attn.hook_z"][...], full["blocks.1.attn.hook_z"][...][:, [1, 3]], atol=1e-6)
    np.testing.assert_allclose(g["blocks.1.attn.hook_pattern"][...], full["blocks.1.attn.hook_pattern"][...][:, [1, 3]], atol=1e-6)
    np.testing.assert_allclose(g["blocks.2.mlp.hook_post"][...], full["blocks.2.mlp.hook_post"][...][:, [0, 5, 7, 200]], atol=1e-6)
    assert g["blocks.1.attn.hook_z"].metadata.dimension_names == ("token", "head", "d_head")


def test_padding_never_reaches_the_store(full):
    lengths = full["seq_length"][...]
    assert full["seq"].shape[0] == lengths.sum()
    ids = full["input_ids"][...]
    np.testing.assert_array_equal(full["tokens"][...], ids[full["seq"][...], full["pos"][...]])
    assert (ids[np.arange(ids.shape[1])[None, :] >= lengths[:, None]] == -1).all()
