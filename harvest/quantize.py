"""8-bit and 4-bit weights through bitsandbytes: every nn.Linear of a stage's blocks is replaced.

A stage loads its weights in the compute dtype on the host, then each block's linear layers are
swapped for ``bnb.nn.Linear8bitLt`` (int8, LLM.int8 with outlier threshold 6) or
``bnb.nn.Linear4bit`` (nf4 / fp4, blocks of 64, compute in the model dtype) and moved to the
stage's device, which is when bitsandbytes quantises them. Embeddings and LayerNorms stay in the
compute dtype. bitsandbytes 0.50 runs all three on CPU as well as on CUDA.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import ModelError, SpecError

KINDS = ("int8", "nf4", "fp4")


def check_quantization(quantization: str | None, hooks) -> None:
    """Refuse what cannot work before anything is created (called from ``prepare``)."""
    if not quantization:
        return
    if quantization not in KINDS:
        raise SpecError(f"model.quantization is {quantization!r}; choose one of {', '.join(KINDS)}")
    try:
        _bnb()
    except ImportError as exc:
        raise SpecError(f"model.quantization: {quantization} needs bitsandbytes ({exc}); "
                        "install it with `pip install -e '.[quant]'`") from None
    results = [p.name for p in hooks if p.template == "attn.hook_result"]
    if results:
        raise SpecError(
            f"{results[0]}: attn.hook_result multiplies z by the attention output weights, which "
            f"model.quantization: {quantization} replaces with packed {quantization} values; capture "
            "attn.hook_z instead (hook_result = z @ W_O per head), or drop the quantization"
        )


def quantize_blocks(blocks: nn.Module, quantization: str, dtype: torch.dtype, device: torch.device) -> int:
    """Swap every nn.Linear under ``blocks`` for its bitsandbytes version on ``device``; returns how many."""
    bnb = _bnb()
    targets = [(name, m) for name, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        setattr(parent, child, _quantized(bnb, linear, quantization, dtype, device))
    left = [n for n, m in blocks.named_modules() if type(m) is nn.Linear]
    if left:
        raise ModelError(f"quantization {quantization}: linear layers left unquantized: {', '.join(left[:3])}")
    return len(targets)


def _quantized(bnb, linear: nn.Linear, quantization: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    weight = linear.weight.data.to("cpu")
    has_bias = linear.bias is not None
    with torch.device("meta"):
        if quantization == "int8":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=dtype, quant_type=quantization)
    if quantization == "int8":
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quantization)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data.to("cpu", dtype), requires_grad=False)
    return q.to(device)  # bitsandbytes quantises when the weight moves to its device


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes  # optional (the `quant` extra): imported only when a spec asks for it

    # every int8 matmul on CPU warns that it casts to float16: say it once, not per batch
    warnings.filterwarnings("once", message=".*MatMul8bitLt.*")
    return bitsandbytes


def quantize_stage(model, quantization: str, dtype: torch.dtype, device: torch.device) -> None:
    """Quantise a loaded ``StageModel``'s blocks onto ``device`` and move the rest there too."""
    quantize_blocks(model.blocks, quantization, dtype, device)
    for module in (model.embed, model.final_norm):
        if module is not None:
            module.to(device)
