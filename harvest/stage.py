"""A pipeline stage: a contiguous run of blocks that loads only its own weights.

A single-process harvest is a pipeline of one stage, so this is the only forward code there is.
The stage recomputes what the full model computes once at its top (rotary embeddings for its
positions, the causal mask), runs its blocks with capture hooks attached, and returns the hidden
state for the next stage.
"""

from __future__ import annotations

import copy
from collections import Counter
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from accelerate.utils import set_module_tensor_to_device
from transformers import AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask

from .capture import BatchIndex, Capture, Selection, statistics_rows
from .checkpoint import TORCH_DTYPES, Checkpoint
from .errors import ModelError
from .hits import Hits
from .hookpoints import HookPoint, expand, split_name
from .layout import Batch
from .quantize import quantize_stage
from .shape import StagePlan
from .running import DeviceStatistics, lockstep
from .statistics import THRESHOLD, TOP_K, HitPlan


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {device!r} but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device(device)


class StageModel(nn.Module):
    """The modules of one stage, materialised from the checkpoint; everything else stays unbuilt."""

    def __init__(self, ckpt: Checkpoint, plan: StagePlan, *, dtype: torch.dtype, device: torch.device,
                 attn_implementation: str, load: bool = True):
        """``load=False``: the skeleton only, on the meta device (to check the files before a run)."""
        super().__init__()
        arch = ckpt.arch
        self.arch, self.plan = arch, plan
        self.config = copy.deepcopy(ckpt.config)
        self.config.use_cache = False
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config, dtype=dtype, attn_implementation=attn_implementation)
        self.config = skeleton.config
        base = getattr(skeleton, arch.base)
        self.embed = getattr(base, arch.embed) if plan.embed else None
        self.blocks = nn.ModuleList(list(getattr(base, arch.blocks))[plan.start:plan.stop])
        self.final_norm = getattr(base, arch.final_norm) if plan.final_norm else None
        self.unembed = getattr(skeleton, arch.unembed) if plan.unembed else None
        with torch.device(device):
            # rotary tables are buffers computed at construction, not weights in the files
            self.rotary = type(getattr(base, arch.rotary))(self.config)
        if not load:
            return
        quantization = ckpt.spec.quantization
        self._load_weights(ckpt, dtype, torch.device("cpu") if quantization else device)
        if quantization:  # bitsandbytes swaps the blocks' linear layers, quantising them onto `device`
            quantize_stage(self, quantization, dtype, device)
        self.eval()

    def file_key(self, name: str) -> str:
        """The checkpoint tensor name of one of this stage's parameters."""
        arch = self.arch
        head, _, rest = name.partition(".")
        if head == "unembed":
            return f"{arch.unembed}.{rest}"
        if head == "blocks":
            i, _, tail = rest.partition(".")
            return f"{arch.base}.{arch.blocks}.{self.plan.start + int(i)}.{tail}"
        module = {"embed": arch.embed, "final_norm": arch.final_norm}[head]
        return f"{arch.base}.{module}.{rest}"

    def _load_weights(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
        wanted = self.file_keys(ckpt, ckpt.available_keys())
        tensors = ckpt.load_tensors(set(wanted.values()))
        uses = Counter(wanted.values())  # tied weights: one file tensor, two parameters
        for name, key in wanted.items():
            uses[key] -= 1
            value = tensors[key] if uses[key] else tensors.pop(key)  # free each file tensor once used
            set_module_tensor_to_device(self, name, device, value=value, dtype=dtype)
        still_meta = [n for n, p in self.named_parameters() if p.is_meta] + [n for n, b in self.named_buffers() if b.is_meta]
        if still_meta:
            # a meta-weight layer fed a real tensor returns garbage, not an error
            raise ModelError(f"stage {self.plan.index}: parameters left unloaded: {', '.join(still_meta[:5])}")

    def file_keys(self, ckpt: Checkpoint, available: set[str]) -> dict[str, str]:
        """Parameter name -> tensor name in the files; raises naming the tensors the files lack."""
        wanted: dict[str, str] = {}
        missing: list[str] = []
        for name, _ in self.named_parameters(remove_duplicate=False):  # tied weights load twice
            if name.startswith("rotary."):
                continue
            key = self.file_key(name)
            found = ckpt.resolve_key(key, available)
            if found is None and name.startswith("unembed."):
                found = self._unembed_in_files(ckpt, name, available)
            if found is None:
                missing.append(key)
            else:
                wanted[name] = found
        if missing:
            raise ModelError(
                f"checkpoint {ckpt.directory} lacks {len(missing)} tensor(s) that stage {self.plan.index} "
                f"({self.plan.describe()}) needs, e.g. {', '.join(missing[:3])}; the files are incomplete "
                "or belong to a different config"
            )
        return wanted

    def _unembed_in_files(self, ckpt: Checkpoint, name: str, available: set[str]) -> str | None:
        """NeoX files call the unembedding ``embed_out``; tied models reuse the embedding."""
        rest = name.split(".", 1)[1]
        for alias in self.arch.unembed_file_aliases:
            if f"{alias}.{rest}" in available:
                return f"{alias}.{rest}"
        if getattr(self.config, "tie_word_embeddings", False) and rest == "weight":
            return ckpt.resolve_key(f"{self.arch.base}.{self.arch.embed}.weight", available)
        return None

    def module_for(self, point: HookPoint) -> nn.Module:
        if point.template in ("unembed.topk_ids", "unembed.topk_logits"):
            return self.unembed
        if point.template == "hook_embed":
            return self.embed
        if point.template == "ln_final.hook_normalized":
            return self.final_norm
        path, _ = self.arch.hooks[point.template]
        block = self.blocks[point.layer - self.plan.start]
        return block.get_submodule(path) if path else block

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor | None, hidden: torch.Tensor | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids) if self.embed is not None else hidden
        position_ids = torch.arange(h.shape[1], device=h.device)[None, :]
        if len(self.blocks):
            position_embeddings = self.rotary(h, position_ids)
            mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                      position_ids=position_ids)
            for block in self.blocks:
                h = block(h, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.unembed is not None:  # predictions at the captured rows; hooks read them
            self.unembed(h.reshape(-1, h.shape[-1]).index_select(0, rows))
        return h


class Stage:
    """A stage model plus its capture hooks: ``run(batch, hidden) -> (hidden, captures on the device)``."""

    def __init__(self, ckpt: Checkpoint, plan: StagePlan, *, compute_dtype: str, store_dtype: torch.dtype,
                 device: torch.device, heads: tuple[int, ...] | None, neurons: tuple[int, ...] | None,
                 top_k: int = 0, statistics: tuple[str, ...] = (), hits: HitPlan | None = None):
        patterns = any(p.template == "attn.hook_pattern" for p in plan.hooks)
        self.device = device
        self.plan = plan
        self.model = StageModel(ckpt, plan, dtype=TORCH_DTYPES[compute_dtype], device=device,
                                attn_implementation="eager" if patterns else "sdpa")
        as_index = lambda xs: None if xs is None else torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        stored = {p.name for p in plan.hooks}
        # hook points with statistics that this stage runs but does not store (capture.statistics)
        only = [p for p in expand([h for h in statistics if h not in stored], ckpt.arch, ckpt.n_layers)
                if _runs(plan, p)] if any(h not in stored for h in statistics) else []
        modules = {p.name: self.model.module_for(p) for p in list(plan.hooks) + only}
        self.capture = Capture(modules, ckpt.arch, list(plan.hooks), Selection(as_index(heads), as_index(neurons)),
                               store_dtype, n_heads=ckpt.config.num_attention_heads, top_k=top_k,
                               statistics=tuple(h for h in statistics if h in modules), statistics_only=only)
        self.hits = Hits(hits, {name: self._ln_module(name) for name in hits.sources}, store_dtype) if hits else None
        hooks = tuple(h for h in statistics if h in modules)
        self.statistics = DeviceStatistics(hooks, TOP_K, THRESHOLD) if hooks else None

    def follow_floors(self, floors) -> None:
        """Take the top-k floor from the writer's accumulator (``StatisticsAccumulator.floors``)."""
        if self.statistics is not None:
            self.statistics.floors = floors

    def _ln_module(self, name: str) -> nn.Module:
        """The LayerNorm module behind ``blocks.{l}.ln{1,2}.hook_normalized`` (captured or not)."""
        template, layer = split_name(name)
        path, _ = self.model.arch.hooks[template]
        return self.model.blocks[layer - self.plan.start].get_submodule(path)

    def run(self, batch: Batch, hidden) -> tuple[Any, dict[str, torch.Tensor]]:
        """Forward one batch. With Dettmers' hits (``harvest.hits``) the hidden state travels as
        ``(hidden, packed hit bitmask)`` between stages."""
        carried = None
        if isinstance(hidden, tuple):
            hidden, carried = hidden
            carried = carried.to(self.device)
        index = BatchIndex(
            flat_rows=torch.from_numpy(batch.flat_rows).to(self.device),
            lengths=torch.from_numpy(batch.lengths).to(self.device),
            batch=batch.index, width=batch.width,
            all_rows=self._all_rows(batch),
        )
        input_ids = torch.from_numpy(batch.input_ids).to(self.device) if self.plan.embed else None
        if hidden is not None:
            hidden = hidden.to(self.device)
        hit_results: dict[str, torch.Tensor] = {}
        hits = (nullcontext(None) if self.hits is None else  # inside the capture's: it checks no hook is left
                self.hits.attached(index.lengths, batch.width, carried, hit_results,
                                   padded=bool((batch.lengths < batch.width).any()),
                                   known=self.statistics.group_max if self.statistics is not None else None))
        on_rows = None
        if self.statistics is not None:
            self.statistics.begin()
            on_rows = self.statistics.early
        with self.capture.attached(index, on_rows) as captured, hits as hit_batch:
            out = self.model(input_ids, hidden, index.flat_rows)
        steps, results = [], {}
        if self.statistics is not None:  # reduced here, on the device; every-position rows never leave it
            rows = {h: statistics_rows(captured, h, pop=True) for h in self.statistics.hooks}
            steps.append(self.statistics.steps(rows, results))
        if hit_batch is not None:  # after the statistics' first step: the hits may take their group maxima
            steps.append(hit_batch.steps())
        lockstep(steps)  # the hits' and the statistics' sizes read together: two host syncs per batch
        captured.update(hit_results)
        captured.update(results)
        handed = hit_batch.handed if hit_batch is not None else []
        return ((out, handed[0]) if handed else out), captured


    def _all_rows(self, batch: Batch) -> torch.Tensor | None:
        """Every real position of the batch, when the statistics need more than the stored rows."""
        if not self.capture.statistics or (len(batch.flat_rows) == int(batch.lengths.sum())
                                           and not self.capture.statistics_only):
            return None  # every position is stored: the statistics read the stored rows
        pos = np.arange(batch.width)
        real = pos[None, :] < batch.lengths[:, None]
        rows = (np.arange(len(batch.lengths))[:, None] * batch.width + pos[None, :])[real]
        return torch.from_numpy(rows.astype(np.int64)).to(self.device)


def _runs(plan: StagePlan, point: HookPoint) -> bool:
    if point.template == "hook_embed":
        return plan.embed
    return point.layer is not None and plan.start <= point.layer < plan.stop


def check_tensors(ckpt: Checkpoint, plans: list[StagePlan]) -> None:
    """Raise ``ModelError`` when the checkpoint lacks a tensor any stage needs: before a store exists.

    Builds each stage's skeleton on the meta device (no weights read) and resolves its parameter
    names against the files' index, exactly as loading will.
    """
    available = ckpt.available_keys()
    for plan in plans:
        skeleton = StageModel(ckpt, plan, dtype=torch.float32, device=torch.device("meta"),
                              attn_implementation="eager", load=False)
        skeleton.file_keys(ckpt, available)
