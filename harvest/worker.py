"""A stage and its writer together: the unit that runs in-process or as a Ray actor.

The same class serves a one-stage job in the driver process and each actor of a pipeline
(``sharding`` wraps it with ``ray.remote``), so there is one capture path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .layout import Batch
from .shape import StagePlan
from .stage import Stage, resolve_device
from .transfer import HostTransfer
from .writer import StageStoreInfo, StageWriter, write_threads_for


@dataclass(frozen=True)
class StageOptions:
    compute_dtype: str
    store_dtype: str
    device: str
    heads: tuple[int, ...] | None
    neurons: tuple[int, ...] | None
    threads: int | None
    write_queue: int
    top_k: int = 0
    write_threads: int | None = None
    statistics: tuple[str, ...] = ()  #: hooks with harvest-time statistics (the stage keeps its own)


class StageWorker:
    """Runs one stage's blocks on each batch and streams its captures to its own arrays."""

    def __init__(self, ckpt: Checkpoint, plan: StagePlan, options: StageOptions, store: StageStoreInfo,
                 start_batch: int):
        if options.threads:
            torch.set_num_threads(options.threads)
        self.device = resolve_device(options.device)
        self.stage = Stage(ckpt, plan, compute_dtype=options.compute_dtype,
                           store_dtype=getattr(torch, options.store_dtype), device=self.device,
                           heads=options.heads, neurons=options.neurons, top_k=options.top_k,
                           statistics=options.statistics,
                           hits=store.statistics.hits if store.statistics is not None else None)
        self.transfer = HostTransfer(self.device)
        self.writer = StageWriter(store, start_batch, max_pending=options.write_queue,
                                  threads=write_threads_for(options.write_threads, self.device.type, len(store.arrays)))
        if self.writer.statistics is not None:  # the device sends top-k candidates above the writer's floor
            self.stage.follow_floors(self.writer.statistics.floors)

    def ready(self) -> bool:
        return True

    def process(self, batch: Batch, hidden: torch.Tensor | None) -> torch.Tensor:
        """Forward one batch; captures go to the writer; returns the hidden state for the next stage."""
        out, captured = self.stage.run(batch, hidden)
        self.writer.submit(batch.index, {"token": batch.rows[0], "sequence": batch.sequences[0]},
                           self.transfer.start(captured))
        return out

    def durable_batches(self) -> int:
        return self.writer.durable_batches

    def close(self) -> dict[str, int]:
        """Flush and return the count of non-finite values stored per array (``on_nonfinite: flag``)."""
        self.writer.close()
        return dict(self.writer.nonfinite)

    def abort(self) -> None:
        self.writer.abort()
