"""Top-k predictions, dtypes, the sdpa guard, and the addition / translation sources end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from harvest.errors import ModelError
from harvest.runner import run
from harvest.spec import parse_spec


def open_(result):
    return zarr.open_group(str(result.path), mode="r")


@pytest.mark.parametrize("arch", ["gpt_neox", "gptj"])
def test_top_k_predictions_match_the_lm_head(arch, make_checkpoint, make_spec):
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(arch)
    g = open_(run(make_spec(ckpt, hooks=["blocks.0.hook_resid_post"], capture={"top_k": 5, "positions": "last"}),
                  progress=False))
    assert g["unembed.topk_ids"].dtype == np.int32 and g["unembed.topk_ids"].shape[1] == 5
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    for row, (s, p) in enumerate(zip(g["seq"][...], g["pos"][...])):
        ids = torch.tensor(g["input_ids"][s, : g["seq_length"][s]])[None].long()
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0, p]
        top = logits.topk(5)
        np.testing.assert_array_equal(g["unembed.topk_ids"][row], top.indices.numpy())
        np.testing.assert_allclose(g["unembed.topk_logits"][row], top.values.numpy(), atol=1e-4)


@pytest.mark.parametrize("dtype,stored,atol", [("float16", "float16", 2e-2), ("bfloat16", "float32", 1e-1)])
def test_half_precision_is_close_to_float32(neox_ckpt, make_spec, dtype, stored, atol):
    hooks = ["blocks.*.hook_resid_post"]
    full = open_(run(make_spec(neox_ckpt, hooks=hooks, store={"path": "f32.zarr"}), progress=False))
    half = open_(run(make_spec(neox_ckpt, hooks=hooks, model={"dtype": dtype}, store={"path": f"{dtype}.zarr"}),
                     progress=False))
    a, b = half["blocks.3.hook_resid_post"], full["blocks.3.hook_resid_post"]
    assert str(a.dtype) == stored
    np.testing.assert_allclose(a[...].astype(np.float32), b[...], atol=atol, rtol=atol)
    assert not np.array_equal(a[...].astype(np.float32), b[...])


def test_patterns_under_sdpa_fail_loudly(neox_ckpt, make_spec, monkeypatch):
    from harvest import stage

    real = stage.StageModel.__init__

    def sdpa_always(self, *args, attn_implementation, **kwargs):
        real(self, *args, attn_implementation="sdpa", **kwargs)

    monkeypatch.setattr(stage.StageModel, "__init__", sdpa_always)
    with pytest.raises(ModelError, match="returned no attention weights.*eager"):
        run(make_spec(neox_ckpt, hooks=["blocks.0.attn.hook_pattern"]), progress=False)


def test_addition_source_end_to_end(neox_ckpt, make_spec):
    prompts = {"source": "addition", "a": [3, 7], "b": [10, 12], "template": "Output ONLY a number.\n{a}+{b}="}
    spec = make_spec(neox_ckpt, hooks=["resid_post"], capture={"positions": "source"}, raw=True)
    spec["prompts"] = prompts
    g = open_(run(parse_spec(spec), progress=False))
    a, b, eq = g["meta/a"][...], g["meta/b"][...], g["meta/eq_pos"][...]
    assert sorted(zip(a, b)) == [(x, y) for x in range(3, 8) for y in range(10, 13)]
    assert g["meta/a_span"].metadata.dimension_names[0] == "sequence"
    seq, pos = g["seq"][...], g["pos"][...]
    for s in range(len(a)):
        rows = pos[seq == s]
        assert eq[s] in rows and g["meta/a_span"][s][1] - 1 in rows and g["meta/b_span"][s][1] - 1 in rows
        assert eq[s] == g["seq_length"][s] - 1


def test_translation_source_end_to_end(neox_ckpt, make_spec):
    spec = make_spec(neox_ckpt, hooks=["blocks.1.attn.hook_pattern"], raw=True)
    spec["prompts"] = {"source": "translation", "pairs": ["en-fr", "en-de", "en-es"], "n_prompts": 4, "words_per_prompt": 3}
    g = open_(run(parse_spec(spec), progress=False))
    assert g["blocks.1.attn.hook_pattern"].shape[0] == 12
    assert g["meta/src_span"].shape == (12, 3, 2) and set(g["meta/pair"][...]) == {0, 1, 2}


def test_tied_embeddings_load_for_the_unembedding(make_checkpoint, make_spec):
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint("gpt_neox", tie_word_embeddings=True)
    g = open_(run(make_spec(ckpt, hooks=["blocks.0.hook_resid_post"], capture={"top_k": 3, "positions": "last"}),
                  progress=False))
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.tensor(g["input_ids"][0, : g["seq_length"][0]])[None].long()
    with torch.no_grad():
        top = model(ids, use_cache=False).logits[0, -1].topk(3)
    np.testing.assert_array_equal(g["unembed.topk_ids"][0], top.indices.numpy())
