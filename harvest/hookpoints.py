"""Hook points as data: TransformerLens names, their dimensions, and the pattern language.

Short names (``resid_post``, ``z``, ``pattern``, ``post`` ...) are normalised here, once;
everything downstream sees canonical names such as ``blocks.3.hook_resid_post``. Patterns:
``blocks.*.hook_z``, ``blocks.{0..3}.mlp.hook_post`` (inclusive), ``blocks.{1,5,9}.ln1.hook_normalized``,
or a bare short name for every layer.

The one pattern language has two resolvers: :func:`expand` against a model (what ``harvest run``
captures) and :func:`resolve` against the hook points a store holds (what an analysis or a query
reads), so a name that works in a spec works the same in every ``harvest analyze`` command.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .architectures import Architecture
from .errors import HookNameError, HookNotInStoreError, did_you_mean

#: block-level templates -> trailing dims of one stored row (the leading axis is added below)
BLOCK_DIMS: dict[str, tuple[str, ...]] = {
    "hook_resid_pre": ("d_model",),
    "hook_resid_post": ("d_model",),
    "ln1.hook_normalized": ("d_model",),
    "ln2.hook_normalized": ("d_model",),
    "attn.hook_z": ("head", "d_head"),
    "attn.hook_result": ("head", "d_model"),
    "attn.hook_pattern": ("head", "query", "key"),
    "hook_attn_out": ("d_model",),
    "hook_mlp_out": ("d_model",),
    "mlp.hook_post": ("neuron",),
}
MODEL_DIMS: dict[str, tuple[str, ...]] = {
    "hook_embed": ("d_model",),
    "ln_final.hook_normalized": ("d_model",),
}
#: the model's top-k next-token predictions at each captured row (``capture.top_k``); the LM head
#: runs on the captured rows only
TOPK_DIMS: dict[str, tuple[str, ...]] = {
    "unembed.topk_ids": ("k",),
    "unembed.topk_logits": ("k",),
}
#: per-sequence hooks: one stored row per sequence, not per token
SEQUENCE_AXIS = {"attn.hook_pattern"}

ALIASES: dict[str, str] = {
    "embed": "hook_embed",
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "ln1": "ln1.hook_normalized",
    "ln2": "ln2.hook_normalized",
    "normalized": "ln1.hook_normalized",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "pattern": "attn.hook_pattern",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "post": "mlp.hook_post",
    "ln_final": "ln_final.hook_normalized",
}


@dataclass(frozen=True)
class HookPoint:
    """A concrete hook point of one model: its store array and where it is read."""

    name: str  #: canonical name and store array name, e.g. ``blocks.3.attn.hook_z``
    template: str  #: ``attn.hook_z`` (block hooks) or the full name (model-level hooks)
    layer: int | None  #: block index; ``None`` for hook_embed, ``-1`` sorts ln_final last
    dims: tuple[str, ...]  #: all dims including the leading ``token`` / ``sequence`` axis
    dtype: str | None = None  #: stored dtype when not the activation dtype (token ids)

    @property
    def axis(self) -> str:
        return self.dims[0]

    @property
    def order(self) -> tuple[int, int]:
        """Position in the forward pass, used to assign hooks to pipeline stages."""
        if self.template == "hook_embed":
            return (-1, 0)
        if self.template == "ln_final.hook_normalized":
            return (1 << 30, 0)
        if self.template in TOPK_DIMS:
            return (1 << 30, 1)
        return (self.layer, 0)


def _hook_point(template: str, layer: int | None) -> HookPoint:
    if layer is None:
        return HookPoint(template, template, None, ("token", *MODEL_DIMS[template]))
    axis = "sequence" if template in SEQUENCE_AXIS else "token"
    return HookPoint(block_name(layer, template), template, layer, (axis, *BLOCK_DIMS[template]))


def topk_points() -> list[HookPoint]:
    return [HookPoint(name, name, None, ("token", *dims), "int32" if name.endswith("ids") else None)
            for name, dims in TOPK_DIMS.items()]


def available_templates(arch: Architecture) -> list[str]:
    return list(MODEL_DIMS) + [t for t in BLOCK_DIMS if t in arch.hooks]


def describe_valid(arch: Architecture, n_layers: int) -> str:
    blocks = [f"blocks.{{0..{n_layers - 1}}}.{t}" for t in BLOCK_DIMS if t in arch.hooks]
    short = ", ".join(sorted(ALIASES))
    return f"{', '.join(list(MODEL_DIMS) + blocks)}; short names: {short}"


def canonical_template(name: str) -> str:
    """``resid_post`` -> ``hook_resid_post``; canonical templates pass through unchanged."""
    return ALIASES.get(name, name)


def parse_pattern(pattern: str) -> tuple[str | None, str]:
    """(layer part as written or ``None`` for a bare name, canonical template) of a hook pattern.

    ``blocks.{0..3}.resid_post`` -> ``("{0..3}", "hook_resid_post")``; ``z`` -> ``(None, "attn.hook_z")``.
    """
    m = re.fullmatch(r"blocks\.(\{[^}]*\}|[^.]+)\.(.+)", pattern.strip())
    if m:
        return m[1], canonical_template(m[2])
    return None, canonical_template(pattern.strip())


def block_name(layer: int, template: str) -> str:
    """The canonical name (and store array) of a block hook point: ``blocks.{layer}.{template}``."""
    return f"blocks.{layer}.{template}"


def split_name(name: str) -> tuple[str, int | None]:
    """A canonical hook name's (template, layer): ``blocks.3.attn.hook_z`` -> ``("attn.hook_z", 3)``;
    a model-level name -> ``(name, None)``."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return (m[2], int(m[1])) if m else (name, None)


def compact_layers(layers) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    layers = sorted(set(int(x) for x in layers))
    if not layers:
        return "none"
    parts, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)


def _parse_layers(spec: str, n_layers: int, pattern: str) -> list[int]:
    if spec == "*":
        return list(range(n_layers))
    if spec.isdigit():
        layers = [int(spec)]
    elif m := re.fullmatch(r"\{(\d+)\.\.(\d+)\}", spec):
        lo, hi = int(m[1]), int(m[2])
        if lo > hi:
            raise HookNameError(f"hook pattern {pattern!r}: range {{{lo}..{hi}}} is empty; write {{{hi}..{lo}}}?")
        layers = list(range(lo, hi + 1))
    elif m := re.fullmatch(r"\{(\d+(?:,\d+)*)\}", spec):
        layers = [int(x) for x in m[1].split(",")]
    else:
        raise HookNameError(
            f"hook pattern {pattern!r}: cannot read the layer part {spec!r}; "
            "use a number, '*', '{a..b}' (inclusive) or '{a,b,c}'"
        )
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise HookNameError(
            f"hook pattern {pattern!r}: layer {bad[0]} does not exist; this model has "
            f"{n_layers} layers (0..{n_layers - 1})"
        )
    return layers


def expand(patterns: list[str], arch: Architecture, n_layers: int, layers: list[int] | None = None) -> list[HookPoint]:
    """Resolve hook patterns to concrete hook points, in forward order, without duplicates.

    ``layers`` (from ``capture.layers``) restricts bare short names and ``*`` patterns.
    """
    templates = available_templates(arch)
    points: dict[str, HookPoint] = {}
    for pattern in patterns:
        pattern = pattern.strip()
        layer_spec, suffix = parse_pattern(pattern)
        if layer_spec is not None:
            found = _parse_layers(layer_spec, n_layers, pattern)
            if layer_spec == "*" and layers is not None:
                found = [x for x in found if x in layers]
        else:
            found = [None] if suffix in MODEL_DIMS else list(layers if layers is not None else range(n_layers))
        if suffix not in templates or (found != [None] and suffix in MODEL_DIMS):
            raise HookNameError(
                f"unknown hook point {pattern!r} for {arch.model_type}"
                f"{did_you_mean(suffix, templates + list(ALIASES))}. "
                f"Valid: {describe_valid(arch, n_layers)}"
            )
        for layer in found:
            point = _hook_point(suffix, layer)
            points[point.name] = point
    return sorted(points.values(), key=lambda p: (p.order, templates.index(p.template)))


def describe_names(names: list[str]) -> str:
    """``hook_embed, hook_resid_post (layers 0-3)``: the hook points in ``names``, by template."""
    by_template: dict[str, list[int]] = {}
    for name in names:
        template, layer = split_name(name)
        by_template.setdefault(template, [])
        if layer is not None:
            by_template[template].append(layer)
    return ", ".join(f"{t} (layers {compact_layers(ls)})" if ls else t for t, ls in by_template.items()) or "none"


def resolve(patterns: str | list[str], names: list[str], where: str = "the store") -> list[str]:
    """The hook names among ``names`` (a store's provenance ``hooks``) that ``patterns`` select.

    The language of ``capture.hooks``, resolved against what a store holds instead of a model:
    ``resid_post`` and ``blocks.*.hook_resid_post`` select every harvested layer of it,
    ``blocks.{0..3}.resid_post`` exactly those layers. Returned in the order of ``names`` (forward
    order in a harvest store). A name that is no hook point, or one the store lacks, raises
    :class:`HookNotInStoreError` naming what the store does hold.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    layers_of: dict[str, dict[int | None, str]] = {}
    for name in names:
        template, layer = split_name(name)
        layers_of.setdefault(template, {})[layer] = name
    known = list(MODEL_DIMS) + list(BLOCK_DIMS) + list(TOPK_DIMS)
    chosen: set[str] = set()
    for pattern in patterns:
        pattern = pattern.strip()
        layer_spec, template = parse_pattern(pattern)
        named = repr(pattern) if pattern == template else f"{pattern!r} ({template})"
        if template not in known:
            hint = did_you_mean(template, list(layers_of) + known + list(ALIASES))
            raise HookNotInStoreError(f"unknown hook point {pattern!r}{hint}; {where} holds: {describe_names(names)}")
        have = layers_of.get(template, {})
        if not have:
            raise HookNotInStoreError(f"hook {named} was not harvested into {where}; "
                                      f"it holds: {describe_names(names)}")
        if layer_spec is None or layer_spec == "*":
            found = list(have.values())
        else:
            if None in have:
                raise HookNotInStoreError(f"hook {pattern!r}: {template} is a model-level hook point; "
                                          f"write it without blocks.N.")
            try:
                wanted = _parse_layers(layer_spec, 1 << 30, pattern)
            except HookNameError as exc:
                raise HookNotInStoreError(str(exc)) from None
            missing = [layer for layer in wanted if layer not in have]
            if missing:
                plural = "s" if len(missing) > 1 else ""
                raise HookNotInStoreError(f"hook {named}: layer{plural} {compact_layers(missing)} not harvested into "
                                          f"{where}; harvested layers of {template}: {compact_layers(have)}")
            found = [have[layer] for layer in wanted]
        chosen.update(found)
    return [name for name in names if name in chosen]
