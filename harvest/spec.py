"""The job spec: typed sections, one validation step, messages that name the offending value.

A spec is YAML with the sections ``model``, ``prompts``, ``capture``, ``run`` and ``store``.
Relative paths (checkpoint, corpus files) are read relative to ``base_dir`` (the working
directory by default); the store path is confined to the store root.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import SpecError, check_keys
from .objstore import configure, is_url, join

DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = (None, "int8", "nf4", "fp4")
COMPRESSORS = ("none", "zstd", "blosc-zstd")
FSYNC = ("shard", "none")
SHARD_WRITERS = ("shards", "zarr")
NONFINITE = ("fail", "flag")
DEFAULT_STORE_ROOT = "stores"


@dataclass(frozen=True)
class ModelSpec:
    #: a local checkpoint directory, or a hub name where the machine has network
    path: str
    revision: str | None = None
    dtype: str = "float32"
    #: "auto" = cuda when available, else cpu
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    quantization: str | None = None
    #: hash every weight file into the fingerprint (slow only for huge checkpoints)
    hash_weights: bool = True


@dataclass(frozen=True)
class Positions:
    """Which positions of each sequence become stored rows."""

    kind: str = "all"  #: all | last | every | sample | source | list
    every: int = 1
    offset: int = 0
    sample: int = 0
    seed: int = 0
    explicit: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: Any) -> Positions:
        where = "capture.positions"
        if value in (None, "all"):
            return cls()
        if value in ("last", "source"):
            return cls(kind=value)
        if isinstance(value, list):
            if not value or not all(isinstance(v, int) for v in value):
                raise SpecError(f"{where}: a list must hold integers (negative counts from the end), got {value!r}")
            return cls(kind="list", explicit=tuple(value))
        if isinstance(value, dict):
            if "every" in value:
                check_keys(where, value, ["every", "offset"])
                every, offset = value["every"], value.get("offset", 0)
                if not isinstance(every, int) or every < 1 or not isinstance(offset, int) or offset < 0:
                    raise SpecError(f"{where}: 'every' must be an integer >= 1 and 'offset' >= 0, got {value!r}")
                return cls(kind="every", every=every, offset=offset)
            if "sample" in value:
                check_keys(where, value, ["sample", "seed"])
                n, seed = value["sample"], value.get("seed", 0)
                if not isinstance(n, int) or n < 1 or not isinstance(seed, int):
                    raise SpecError(f"{where}: 'sample' must be an integer >= 1 and 'seed' an integer, got {value!r}")
                return cls(kind="sample", sample=n, seed=seed)
        raise SpecError(
            f"{where}: cannot read {value!r}; use 'all', 'last', 'source', a list of positions, "
            "{every: N, offset: K} or {sample: N, seed: S}"
        )

    def to_yaml(self) -> Any:
        if self.kind in ("all", "last", "source"):
            return self.kind
        if self.kind == "list":
            return list(self.explicit)
        if self.kind == "every":
            return {"every": self.every, "offset": self.offset}
        return {"sample": self.sample, "seed": self.seed}


@dataclass(frozen=True)
class CaptureSpec:
    hooks: tuple[str, ...]
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    positions: Positions = field(default_factory=Positions)
    #: dtype of stored activations; default: the compute dtype (bfloat16 is stored as float32)
    dtype: str | None = None
    on_nonfinite: str = "fail"
    #: keep the model's top-k next-token predictions (ids and logits) at every captured row
    top_k: int = 0
    #: running statistics over every position of every sequence: true (the default: every
    #: ln*.hook_normalized and hook_resid_* captured, and Dettmers' hits of every captured layer),
    #: a list of hook patterns (added to those; stored or not) or false
    statistics: bool | tuple[str, ...] | None = None


@dataclass(frozen=True)
class RunSpec:
    batch_size: int = 8
    stages: int = 1
    #: copies of the pipeline harvesting different units of the prompts at once ("auto": as many as the GPUs allow)
    replicas: int | Literal["auto"] = 1
    #: torch threads per stage (None: torch's default)
    threads: int | None = None
    #: batches waiting for the writer before compute blocks (bounds memory)
    write_queue: int = 4
    #: threads per stage writing its arrays at once (None: 1 on CPU, whose cores compute; up to 8 on a GPU)
    write_threads: int | None = None
    #: Ray cluster to run the stages on (None: $RAY_ADDRESS, else an embedded local cluster)
    address: str | None = None
    #: micro-batches in the pipeline at once (None: two per stage)
    max_in_flight: int | None = None
    #: memory per stage in GiB that the plan must fit: one number, or one per stage (None: detect)
    memory_gib: float | tuple[float, ...] | None = None
    #: times a crashed stage actor is restarted before the job fails
    max_restarts: int = 3
    #: start the Ray dashboard of an embedded cluster (bound to 127.0.0.1)
    dashboard: bool = False


@dataclass(frozen=True)
class StoreSpec:
    path: str
    root: str = DEFAULT_STORE_ROOT
    chunk_mib: float = 8.0
    #: one buffer of chunk_mib * chunks_per_shard per array while writing (memory); fewer files when larger
    chunks_per_shard: int = 2
    compressor: str = "none"
    level: int = 1
    #: when shard files reach the device: "shard" (each one before the manifest counts its rows) or "none" (the
    #: kernel decides: a crashed process loses nothing, a crashed machine may lose batches the manifest counts)
    fsync: str = "shard"
    #: write shards with O_DIRECT (4 KiB-aligned, past the page cache: a fifth of the CPU; falls back where refused)
    direct_io: bool = False
    #: who encodes shard files: "shards" (harvest.shards, each chunk from its slice; compression falls back to zarr)
    #: or "zarr" (zarr-python's pipeline for every array: the reference, several times slower)
    writer: str = "shards"
    #: where an object store is (endpoint, region) for a store.root URL; credentials come from the environment
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: ModelSpec
    prompts: dict[str, Any]
    capture: CaptureSpec
    run: RunSpec
    store: StoreSpec
    base_dir: Path = Path(".")

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved spec, as recorded in the store's provenance."""
        capture = dataclasses.asdict(self.capture)
        capture["positions"] = self.capture.positions.to_yaml()
        for key in ("hooks", "layers", "heads", "neurons", "statistics"):
            if isinstance(capture[key], tuple):
                capture[key] = list(capture[key])
        return {
            "name": self.name,
            "model": dataclasses.asdict(self.model),
            "prompts": dict(self.prompts),
            "capture": capture,
            "run": dataclasses.asdict(self.run),
            "store": dataclasses.asdict(self.store),
        }

    def store_path(self) -> Path | str:
        """The store's location, guaranteed to lie inside the store root: a ``Path``, or a URL string
        (``s3://bucket/prefix/job.zarr``) when store.root is on object storage (``harvest.objstore``)."""
        root = self.store.root.removeprefix("file://")
        if is_url(root):
            url = join(root, self.store.path)
            configure(url, self.store.storage_options)
            return url
        if "://" in root:
            raise SpecError(f"store.root {self.store.root!r}: unknown URL scheme; use s3://, gs://, file:// or a path")
        return confine(self.resolve(root), self.store.path)

    def resolve(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.base_dir / p


def confine(root: Path, relative: str) -> Path:
    """``root / relative``, refusing anything that resolves outside ``root``."""
    if "://" in relative:
        raise SpecError(f"store.path {relative!r}: URLs are not supported yet; give a path under store.root")
    root = root.expanduser().resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise SpecError(
            f"store.path {relative!r} resolves to {target}, outside the store root {root}; "
            "give a path inside the root (no '..', no absolute path elsewhere), or set --store-root"
        )
    if target == root:
        raise SpecError(f"store.path {relative!r} is the store root itself; name a store inside it, e.g. 'job.zarr'")
    return target


def _typed(section: str, raw: dict[str, Any], cls: type, convert: dict[str, Any] | None = None):
    """Build a frozen dataclass from a YAML mapping, checking keys and simple types."""
    if not isinstance(raw, dict):
        raise SpecError(f"section {section!r} must be a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(section, raw, fields)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, given in raw.items():
        value = convert[key](given) if convert and key in convert else given
        if not _is_a(value, hints[key]):
            lowest = MINIMUM.get(f"{section}.{key}")
            raise SpecError(f"{section}.{key} must be {_describe(hints[key], lowest)}, got {given!r}")
        values[key] = value
    required = [
        f.name for f in fields.values()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values
    ]
    if required:
        raise SpecError(f"section {section!r} is missing required key(s): {', '.join(required)}")
    return cls(**values)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether a spec value fits a field's annotation (YAML gives ints where floats are asked: fine).

    One check at the boundary for every key, so that a wrong type is a one-line error here rather
    than a traceback deep in torch or zarr (``batch_size: 2.5``, ``device: 5``). ``bool`` is not
    accepted as a number, although Python counts it as one.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, tuple) and all(_is_a(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


#: the smallest value of numeric keys, named in the message of a wrong type too
MINIMUM = {"run.batch_size": 1, "run.stages": 1, "run.write_queue": 1, "run.threads": 1, "run.write_threads": 1,
           "run.max_in_flight": 1, "run.max_restarts": 0, "run.replicas": 1, "capture.top_k": 0, "store.chunks_per_shard": 1,
           "store.level": 0}


def _describe(hint: Any, minimum: float | None = None) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h, minimum) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    bound = f" >= {minimum}" if minimum is not None and hint in (int, float) else ""
    return {type(None): "null", bool: "true or false", int: f"an integer{bound}", float: f"a number{bound}",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _int_list(key: str):
    def convert(value: Any) -> tuple[int, ...] | None:
        if value is None or value == "all":
            return None
        if isinstance(value, int):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
            raise SpecError(f"capture.{key} must be 'all' or a list of non-negative integers, got {value!r}")
        return tuple(sorted(set(value)))

    return convert


def _choice(section: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise SpecError(f"{section} is {value!r}; choose one of {', '.join(map(str, allowed))}")


def _integer(key: str, value: Any, minimum: int, note: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{key} must be an integer >= {minimum}{f' ({note})' if note else ''}, got {value!r}")


def _positive(section: str, value: Any, minimum: float = 1) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{section} must be a number >= {minimum}, got {value!r}")


def _check_pipeline(run: RunSpec) -> None:
    if run.replicas != "auto":
        _integer("run.replicas", run.replicas, 1, "or 'auto': as many as the cluster's GPUs allow")
    if run.max_in_flight is not None:
        _integer("run.max_in_flight", run.max_in_flight, 1)
    _integer("run.max_restarts", run.max_restarts, 0)
    if run.address is not None and not isinstance(run.address, str):
        raise SpecError(f"run.address must be a Ray address such as 'ray://host:10001' or 'auto', got {run.address!r}")
    if not isinstance(run.dashboard, bool):
        raise SpecError(f"run.dashboard must be true or false, got {run.dashboard!r}")
    memory = run.memory_gib
    if memory is not None:
        values = memory if isinstance(memory, tuple) else (memory,)
        for v in values:
            _positive("run.memory_gib", v, 1 / 1024)
        if isinstance(memory, tuple) and len(memory) != run.stages:
            raise SpecError(f"run.memory_gib lists {len(memory)} values but run.stages is {run.stages}; "
                            "give one number for every stage, or one per stage")


def parse_spec(raw: Any, base_dir: Path | str = ".", store_root: str | None = None) -> JobSpec:
    """Validate a spec mapping (as loaded from YAML) into a ``JobSpec``."""
    if not isinstance(raw, dict):
        raise SpecError(f"a job spec is a YAML mapping with sections model, prompts, capture, run, store; got {type(raw).__name__}")
    check_keys("the spec", raw, ["name", "model", "prompts", "capture", "run", "store"])
    for section in ("model", "prompts", "capture", "store"):
        if section not in raw:
            raise SpecError(f"the spec has no {section!r} section; see jobs/demo.yaml for a complete example")
    model = _typed("model", raw["model"], ModelSpec)
    _choice("model.dtype", model.dtype, DTYPES)
    _choice("model.quantization", model.quantization, QUANTIZATIONS)
    if model.device not in ("auto", "cpu") and not model.device.startswith("cuda"):
        raise SpecError(f"model.device is {model.device!r}; use 'auto', 'cpu' or 'cuda[:N]'")
    capture = _typed(
        "capture", raw["capture"], CaptureSpec,
        convert={
            "hooks": lambda v: tuple([v] if isinstance(v, str) else v) if v else (),
            "layers": _int_list("layers"), "heads": _int_list("heads"), "neurons": _int_list("neurons"),
            "positions": Positions.parse,
            "statistics": lambda v: tuple(v) if isinstance(v, list) else v,  # a bare string is refused: yes/no?
        },
    )
    if not capture.hooks or not all(isinstance(h, str) for h in capture.hooks):
        raise SpecError("capture.hooks must name at least one hook point, e.g. ['blocks.*.hook_resid_post']")
    _choice("capture.on_nonfinite", capture.on_nonfinite, NONFINITE)
    _integer("capture.top_k", capture.top_k, 0, "0: no predictions kept")
    if capture.dtype is not None:
        _choice("capture.dtype", capture.dtype, ("float32", "float16"))
    run = _typed("run", raw.get("run") or {}, RunSpec,
                 convert={"memory_gib": lambda v: tuple(v) if isinstance(v, list) else v})
    _integer("run.batch_size", run.batch_size, 1)
    _integer("run.stages", run.stages, 1)
    _integer("run.write_queue", run.write_queue, 1)
    if run.threads is not None:
        _integer("run.threads", run.threads, 1)
    if run.write_threads is not None:
        _integer("run.write_threads", run.write_threads, 1, "or null: 1 on CPU, up to 8 on a GPU")
    _check_pipeline(run)
    if capture.statistics is None:  # on by default, with any run.replicas (units merge in unit order)
        capture = dataclasses.replace(capture, statistics=True)
    store_raw = dict(raw["store"]) if isinstance(raw["store"], dict) else raw["store"]
    if store_root is not None and isinstance(store_raw, dict):
        store_raw["root"] = store_root
    store = _typed("store", store_raw, StoreSpec)
    _choice("store.compressor", store.compressor, COMPRESSORS)
    _choice("store.fsync", store.fsync, FSYNC)
    _choice("store.writer", store.writer, SHARD_WRITERS)
    if not isinstance(store.direct_io, bool):
        raise SpecError(f"store.direct_io must be true or false, got {store.direct_io!r}")
    _positive("store.chunk_mib", store.chunk_mib, 1 / 1024)
    _integer("store.chunks_per_shard", store.chunks_per_shard, 1)
    _integer("store.level", store.level, 0)
    prompts = raw["prompts"]
    if not isinstance(prompts, dict) or "source" not in prompts:
        raise SpecError("section 'prompts' must be a mapping with a 'source' (text, addition or translation)")
    name = raw.get("name") or Path(store.path).stem
    spec = JobSpec(name=str(name), model=model, prompts=dict(prompts), capture=capture, run=run, store=store,
                   base_dir=Path(base_dir))
    spec.store_path()  # confine early: a bad path fails before anything is loaded
    return spec


def _tab_near(text: str, mark, problem: str) -> bool:
    """Whether a YAML error is about a tab: YAML's own message ("found character '\\t'") or a tab before its column."""
    if "'\\t'" in problem:
        return True
    lines = text.splitlines()
    return mark is not None and mark.line < len(lines) and "\t" in lines[mark.line][: mark.column + 1]


def load_spec(path: str | Path, base_dir: Path | str = ".", store_root: str | None = None) -> JobSpec:
    """Read and validate a YAML job spec."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"no job spec at {path}; pass the path of a YAML file such as jobs/demo.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join((getattr(exc, "problem", None) or str(exc)).split())
        if _tab_near(text, mark, problem):
            problem = "a tab character; indent with spaces (YAML does not allow tabs for indentation)"
        raise SpecError(f"{path} is not valid YAML{where}: {problem}") from None
    return parse_spec(raw, base_dir=base_dir, store_root=store_root)
