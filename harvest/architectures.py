"""One declarative table per architecture: where each hook point lives in the transformers model.

Shared code never branches on the architecture; it asks the table. Paths are relative to the
model (``base``, ``embed``, ...) or to one block (``hooks``). What a hook reads from its module:

- ``input``: the module's first positional input (a forward pre-hook);
- ``output``: the module's output;
- ``output[0]`` / ``output[1]``: an element of a tuple output (attention returns
  ``(attn_output, attn_weights)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ModelError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    base: str  #: the base model inside ``*ForCausalLM``
    embed: str
    blocks: str
    final_norm: str
    rotary: str
    unembed: str
    #: names the unembedding has in checkpoint files besides ``unembed``
    unembed_file_aliases: tuple[str, ...]
    #: hook template -> (module path relative to a block, what to read)
    hooks: dict[str, tuple[str, str]]
    #: per-block LayerNorms copied into the store for the analyses (store name -> module path)
    layer_norms: dict[str, str]
    #: the output projection whose input is the per-head ``z``
    attn_out_proj: str
    attention: str
    #: keys in old checkpoints that are buffers, not weights
    ignored_file_keys: tuple[str, ...] = field(default=())

    def d_mlp(self, config) -> int:
        if self.model_type == "gptj":
            return config.n_inner if config.n_inner is not None else 4 * config.n_embd
        return config.intermediate_size


GPT_NEOX = Architecture(
    model_type="gpt_neox",
    base="gpt_neox",
    embed="embed_in",
    blocks="layers",
    final_norm="final_layer_norm",
    rotary="rotary_emb",
    unembed="lm_head",
    unembed_file_aliases=("embed_out",),
    # x_out = x + attn(ln1(x)) + mlp(ln2(x))            (use_parallel_residual, the default)
    # x_mid = x + attn(ln1(x)); x_out = x_mid + mlp(ln2(x_mid))   (sequential)
    hooks={
        "hook_resid_pre": ("", "input"),
        "hook_resid_post": ("", "output"),
        "ln1.hook_normalized": ("input_layernorm", "output"),
        "ln2.hook_normalized": ("post_attention_layernorm", "output"),
        "attn.hook_z": ("attention.dense", "input"),
        "attn.hook_result": ("attention.dense", "input"),
        "attn.hook_pattern": ("attention", "output[1]"),
        "hook_attn_out": ("attention", "output[0]"),
        "mlp.hook_post": ("mlp.act", "output"),
        "hook_mlp_out": ("mlp", "output"),
    },
    layer_norms={"ln1": "input_layernorm", "ln2": "post_attention_layernorm"},
    attn_out_proj="attention.dense",
    attention="attention",
    ignored_file_keys=("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"),
)

GPTJ = Architecture(
    model_type="gptj",
    base="transformer",
    embed="wte",
    blocks="h",
    final_norm="ln_f",
    rotary="rotary_emb",
    unembed="lm_head",
    unembed_file_aliases=(),
    # x_out = x + attn(ln1(x)) + mlp(ln1(x))   -- one LayerNorm feeds both sublayers
    hooks={
        "hook_resid_pre": ("", "input"),
        "hook_resid_post": ("", "output"),
        "ln1.hook_normalized": ("ln_1", "output"),
        "attn.hook_z": ("attn.out_proj", "input"),
        "attn.hook_result": ("attn.out_proj", "input"),
        "attn.hook_pattern": ("attn", "output[1]"),
        "hook_attn_out": ("attn", "output[0]"),
        "mlp.hook_post": ("mlp.act", "output"),
        "hook_mlp_out": ("mlp", "output"),
    },
    layer_norms={"ln1": "ln_1"},
    attn_out_proj="attn.out_proj",
    attention="attn",
    ignored_file_keys=("attn.bias", "attn.masked_bias"),
)

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (GPT_NEOX, GPTJ)}


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelError(
            f"unsupported model type {model_type!r}: this harvester supports "
            f"{', '.join(sorted(ARCHITECTURES))} (GPT-J-6B, GPT-NeoX-20B, the Pythia family). "
            "Check config.json's 'model_type'."
        ) from None
