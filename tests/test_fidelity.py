"""Every captured activation against an independent reference.

References: transformers' own ``output_hidden_states`` / ``output_attentions`` from a model loaded
with ``from_pretrained`` (not our loader), forward hooks on that model's sublayers, and hand
computations from its weights. Each sequence is run alone (no padding) by the reference, while the
harvest runs padded batches, so padding handling is checked too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from harvest.runner import run

ALL_HOOKS = ["hook_embed", "resid_pre", "resid_post", "ln1", "z", "result", "pattern", "attn_out", "mlp_out",
             "post", "ln_final"]
ATOL = 2e-5


def reference(ckpt, input_ids: list[int]):
    """HF's own forward on one unpadded sequence, plus each sublayer's output via HF-side hooks."""
    from transformers import AutoModelForCausalLM

    model = reference.cache.get(ckpt)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
        reference.cache[ckpt] = model
    base = getattr(model, model.base_model_prefix)
    blocks = base.layers if hasattr(base, "layers") else base.h
    sub = {}
    handles = []
    for i, block in enumerate(blocks):
        attn = block.attention if hasattr(block, "attention") else block.attn
        handles.append(attn.register_forward_hook(lambda m, a, o, i=i: sub.__setitem__(("attn", i), o[0][0])))
        handles.append(block.mlp.register_forward_hook(lambda m, a, o, i=i: sub.__setitem__(("mlp", i), o[0])))
    try:
        with torch.no_grad():
            out = model(torch.tensor([input_ids]), output_hidden_states=True, output_attentions=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return model, blocks, out, sub


reference.cache = {}


def rows_of(group, s: int) -> slice:
    seq = group["seq"][...]
    idx = np.flatnonzero(seq == s)
    return slice(int(idx[0]), int(idx[-1]) + 1)


CASES = [
    pytest.param("gpt_neox", {}, id="neox-parallel"),
    pytest.param("gpt_neox", {"use_parallel_residual": False}, id="neox-sequential"),
    pytest.param("gptj", {}, id="gptj-partial-rotary"),
]


@pytest.mark.parametrize("arch,overrides", CASES)
def test_every_hook_matches_transformers(arch, overrides, make_checkpoint, make_spec):
    ckpt = make_checkpoint(arch, **overrides)
    hooks = ALL_HOOKS + (["ln2"] if arch == "gpt_neox" else [])
    result = run(make_spec(ckpt, hooks=hooks), progress=False)
    g = zarr.open_group(str(result.path), mode="r")
    lengths = g["seq_length"][...]
    assert len(set(lengths.tolist())) > 1, "the corpus should give sequences of several lengths (padding)"
    n_layers = g["model/ln1.w"].shape[0]
    for s, n in enumerate(lengths):
        ids = g["input_ids"][s, :n].tolist()
        model, blocks, out, sub = reference(ckpt, ids)
        r = rows_of(g, s)
        assert (g["pos"][r] == np.arange(n)).all() and (g["tokens"][r] == ids).all()
        hs = [h[0].numpy() for h in out.hidden_states]
        np.testing.assert_allclose(g["hook_embed"][r], hs[0], atol=ATOL)
        for layer in range(n_layers):
            block = blocks[layer]
            get = lambda name: g[f"blocks.{layer}.{name}"]  # noqa: E731
            pre, post = get("hook_resid_pre")[r], get("hook_resid_post")[r]
            np.testing.assert_allclose(pre, hs[layer], atol=ATOL)
            if layer < n_layers - 1:  # hidden_states[-1] is after the final LayerNorm
                np.testing.assert_allclose(post, hs[layer + 1], atol=ATOL)
            np.testing.assert_allclose(get("attn.hook_pattern")[s][:, :n, :n], out.attentions[layer][0].numpy(), atol=ATOL)
            assert not get("attn.hook_pattern")[s][:, n:, :].any(), "padding queries must not be stored"
            attn_out, mlp_out = get("hook_attn_out")[r], get("hook_mlp_out")[r]
            np.testing.assert_allclose(attn_out, sub[("attn", layer)].numpy(), atol=ATOL)
            np.testing.assert_allclose(mlp_out, sub[("mlp", layer)].numpy(), atol=ATOL)
            np.testing.assert_allclose(attn_out + mlp_out + pre, post, atol=ATOL)
            # z through W_O, head by head, reproduces the attention output
            out_proj = block.attention.dense if arch == "gpt_neox" else block.attn.out_proj
            z = torch.from_numpy(get("attn.hook_z")[r])
            w_o = out_proj.weight.detach().reshape(out_proj.weight.shape[0], z.shape[1], z.shape[2])
            per_head = torch.einsum("thd,mhd->thm", z, w_o)
            bias = out_proj.bias.detach().numpy() if out_proj.bias is not None else 0
            np.testing.assert_allclose(per_head.sum(1).numpy() + bias, attn_out, atol=ATOL)
            np.testing.assert_allclose(get("attn.hook_result")[r], per_head.numpy(), atol=ATOL)
            # LayerNorms and MLP neurons by hand from the weights
            ln1 = block.input_layernorm if arch == "gpt_neox" else block.ln_1
            x = torch.from_numpy(pre)
            np.testing.assert_allclose(get("ln1.hook_normalized")[r],
                                       F.layer_norm(x, x.shape[-1:], ln1.weight, ln1.bias, ln1.eps).detach(), atol=ATOL)
            if arch == "gpt_neox":
                ln2 = block.post_attention_layernorm
                mlp_in = x if overrides.get("use_parallel_residual", True) else x + torch.from_numpy(attn_out)
                normed = F.layer_norm(mlp_in, x.shape[-1:], ln2.weight, ln2.bias, ln2.eps)
                np.testing.assert_allclose(get("ln2.hook_normalized")[r], normed.detach(), atol=ATOL)
                fc_in = block.mlp.dense_h_to_4h
            else:
                normed = F.layer_norm(x, x.shape[-1:], ln1.weight, ln1.bias, ln1.eps)
                fc_in = block.mlp.fc_in
            neurons = F.gelu(F.linear(normed, fc_in.weight, fc_in.bias), approximate="none" if arch == "gpt_neox" else "tanh")
            np.testing.assert_allclose(get("mlp.hook_post")[r], neurons.detach(), atol=1e-4)
        np.testing.assert_allclose(g["ln_final.hook_normalized"][r], hs[-1], atol=ATOL)


def test_layer_norm_weights_are_copied(neox_ckpt, make_spec):
    from safetensors.torch import load_file

    result = run(make_spec(neox_ckpt), progress=False)
    g = zarr.open_group(str(result.path), mode="r")
    weights = load_file(neox_ckpt / "model.safetensors")
    np.testing.assert_array_equal(g["model/ln2.w"][2], weights["gpt_neox.layers.2.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(g["model/ln_final.b"][...], weights["gpt_neox.final_layer_norm.bias"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["gpt_neox", "gptj"])
def test_cuda_harvest_matches_transformers_on_the_gpu(arch, make_checkpoint, make_spec):
    """The GPU path (side-stream copies to pinned memory, NaN/inf counted on the device, a pool of
    write threads) against HF's own forward on the same GPU, sequence by sequence."""
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(arch)
    hooks = ["resid_post", "post", "pattern"]
    result = run(make_spec(ckpt, hooks=hooks, model={"device": "cuda"}), progress=False)
    g = zarr.open_group(str(result.path), mode="r")
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").cuda().eval()
    for s, n in enumerate(g["seq_length"][...]):
        ids = g["input_ids"][s, :n].tolist()
        with torch.no_grad():
            out = model(torch.tensor([ids], device="cuda"), output_hidden_states=True, output_attentions=True,
                        use_cache=False)
        r = rows_of(g, s)
        for layer in range(len(out.attentions) - 1):  # the last hidden state is after ln_final
            np.testing.assert_allclose(g[f"blocks.{layer}.hook_resid_post"][r], out.hidden_states[layer + 1][0].cpu(),
                                       atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(g[f"blocks.{layer}.attn.hook_pattern"][s, :, :n, :n],
                                       out.attentions[layer][0].cpu(), atol=1e-5)
    assert g.attrs["harvest"]["status"] == "complete"
