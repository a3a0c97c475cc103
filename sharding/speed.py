"""How fast a job should run, and whether its store's target can keep up (``harvest plan``).

Two short probes, each a fraction of a second, and a model that turns them into the plan's figures:

- **compute**: a matmul on the plan's device in its dtype gives FLOP/s; a replica's expected tokens/s
  is ``EFFICIENCY[device] x FLOP/s / FLOPs per token of its slowest stage`` (the plan's per-stage
  count: 2 per weight, attention, capture work). The efficiencies are calibrated against forwards
  measured in this project (see ``EFFICIENCY``). A rate the user gives (``--tokens-per-second``)
  replaces the probe.
- **write**: ``WRITE_PROBE_MIB`` written and fdatasync'd to a temporary file under the store's root,
  then deleted: what the target makes durable per second, the regime of ``store.fsync: shard``.
  Object-store roots are not probed (a PUT probe measures the network, not the bucket's limit).

The write bandwidth a job needs is the store's bytes per forward token x tokens/s, per replica and
for every replica together; on one machine they all share its disk.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: fraction of the probe's matmul FLOP/s a forward reaches, counting FLOPs as the plan does.
#: cpu: Pythia-160m's shape (fp32, 8 x 256 tokens, base model, 1 thread) measured side by side with the
#: probe on this project's 2-core AMD EPYC: 525 tok/s = 92 GFLOP/s by the plan's 174.8 MFLOP/token,
#: against 94-105 GFLOP/s from the probe: 0.87-0.98, so 0.85 (bench/plan_calibration.py; bench/RESULTS.md,
#: "Plan speed").
#: cuda: GPT-J-6B fp16 (8 x 512 tokens, base model) ran 41.6k tok/s on an H200 (bench/gpu_harvest-h200.json)
#: = 475 TFLOP/s by the plan's 11.43 GFLOP/token; no probe was recorded on that card, and a large fp16
#: matmul reaches ~750-800 TFLOP/s on it (cuBLAS, typical: to confirm with this probe on the card): 0.6.
#: Both are a forward's rate: a harvest's writes can only lower it (the write check below says by how much).
EFFICIENCY = {"cpu": 0.85, "cuda": 0.6}
#: bytes the write probe makes durable (large enough to pass the device's own cache, small enough to stay quick)
WRITE_PROBE_MIB = 128


def probe_flops(device: str, dtype: str, threads: int | None = None, seconds: float = 0.25) -> float:
    """FLOP/s of square matmuls on ``device`` ("cpu" or "cuda") in ``dtype``, timed for about ``seconds``."""
    torch_dtype = getattr(torch, dtype)
    if device == "cpu" and torch_dtype != torch.float32:
        torch_dtype = torch.float32  # CPU stages compute half precision through float32 kernels
    n = 1024 if device == "cpu" else 8192
    before = torch.get_num_threads()
    if threads and device == "cpu":
        torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device).to(torch_dtype)
        b = torch.randn(n, n, device=device).to(torch_dtype)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        a @ b  # warm-up: kernels chosen, pages touched
        sync()
        done, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds or done < 3:
            a @ b
            sync()
            done += 1
        return 2.0 * n**3 * done / elapsed
    finally:
        torch.set_num_threads(before)


def probe_write(directory: Path, mib: int = WRITE_PROBE_MIB) -> float:
    """Bytes per second made durable under ``directory``: write ``mib`` MiB, fdatasync, delete."""
    block = os.urandom(8 * 2**20)
    fd, name = tempfile.mkstemp(prefix=".harvest-write-probe-", dir=directory)
    try:
        t0 = time.perf_counter()
        written = 0
        while written < mib * 2**20:
            written += os.write(fd, block)
        os.fdatasync(fd)
        return written / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(name)


def existing_parent(path: Path) -> Path:
    """The nearest directory of ``path`` (or above it) that exists: the store may not yet."""
    path = Path(path).absolute()
    while not path.is_dir():
        path = path.parent
    return path


@dataclass
class Speed:
    """Expected tokens/s and the write bandwidth they need, each figure with where it came from."""

    replicas: int
    per_replica: float | None  #: forward tokens/s of one replica (None: not estimated)
    rate_source: str
    bytes_per_token: float  #: stored bytes per forward token
    target: float | None = None  #: bytes/s the store's target makes durable (None: not probed)
    target_source: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> float | None:
        return None if self.per_replica is None else self.per_replica * self.replicas

    @property
    def write_per_replica(self) -> float | None:
        return None if self.per_replica is None else self.per_replica * self.bytes_per_token

    @property
    def write_total(self) -> float | None:
        return None if self.total is None else self.total * self.bytes_per_token

    def lines(self) -> list[str]:
        gb = lambda v: f"{v / 1e9:.2f} GB/s"  # noqa: E731
        if self.per_replica is None:
            out = [f"expected tokens/s: not estimated ({self.rate_source})"]
        else:
            out = [f"expected tokens/s: {self.per_replica:,.0f} per replica, {self.total:,.0f} in all "
                   f"({self.replicas} replica(s)); source: {self.rate_source}",
                   f"  write bandwidth that needs: {gb(self.write_per_replica)} per replica, {gb(self.write_total)} "
                   f"in all ({self.bytes_per_token / 1e3:,.1f} KB stored per forward token x tokens/s)"]
        if self.target is not None:
            out.append(f"  store target writes {gb(self.target)} ({self.target_source})")
        elif self.target_source:
            out.append(f"  store target: {self.target_source}")
        return out + [f"WARNING: {w}" for w in self.warnings]


def job_speed(plan, replicas: int, *, tokens_per_second: float | None = None, probe: bool = True,
              threads: int | None = None) -> Speed:
    """Expected tokens/s of ``plan`` with ``replicas`` replicas, and its write bandwidth against the target's.

    ``tokens_per_second``: one replica's rate as the user knows it (replaces the compute probe);
    ``probe``: False measures nothing (no matmul, no file written); ``threads``: a CPU stage's threads.
    """
    spec, work = plan.spec, plan.work
    tokens = work.n_tokens or work.n_sequences * work.max_len
    per_token = plan.store_bytes / max(tokens, 1)
    slowest = max(s.flops_per_token for s in plan.stages)
    if tokens_per_second is not None:
        rate, source = float(tokens_per_second), "--tokens-per-second (as given)"
    elif not probe:
        rate, source = None, "--no-probe; pass --tokens-per-second to give a replica's rate"
    elif plan.device == "cuda" and not torch.cuda.is_available():
        rate, source = None, "no GPU here to probe; pass --tokens-per-second to give a replica's rate"
    else:
        flops = probe_flops(plan.device, spec.model.dtype, threads)
        eff = EFFICIENCY[plan.device]
        rate = eff * flops / slowest
        name = torch.cuda.get_device_name() if plan.device == "cuda" else f"cpu, {threads or torch.get_num_threads()} thread(s)"
        source = (f"matmul probe on this machine's {name}: {flops / 1e12:.3g} TFLOP/s in "
                  f"{spec.model.dtype if plan.device == 'cuda' else 'float32'} x efficiency {eff} (sharding/speed.py, "
                  f"calibrated on recorded forwards) / {slowest / 1e6:,.1f} MFLOP/token of the slowest stage")
    speed = Speed(replicas, rate, source, per_token)
    root = spec.store_path()
    if isinstance(root, str) and "://" in root and not root.startswith("file://"):
        speed.target_source = "an object store: not probed (a PUT probe measures this machine's network, not the bucket)"
    elif not probe:
        speed.target_source = "not probed (--no-probe)"
    elif spec.run.address or os.environ.get("RAY_ADDRESS"):
        speed.target_source = "not probed: the job runs on a cluster whose nodes write, not this machine"
    else:
        where = existing_parent(Path(str(root).removeprefix("file://")).parent)
        speed.target = probe_write(where)
        speed.target_source = f"measured: {WRITE_PROBE_MIB} MiB written + fdatasync under {where}, then deleted"
        if speed.write_total is not None and speed.target < speed.write_total:
            speed.warnings.append(
                f"the store's target writes {speed.target / 1e9:.2f} GB/s but {replicas} replica(s) at the expected "
                f"rate need {speed.write_total / 1e9:.2f} GB/s: the disk, not compute, will set the pace "
                f"(~{speed.target / per_token:,.0f} tok/s); fewer hooks, capture.positions, store.root on a faster "
                "disk, or store.fsync: none (page cache only) would help")
    return speed
