"""Moving a batch's captures off the GPU without stalling its compute.

The copies to pinned host memory run on a side stream, so the next batch's forward runs while
this batch's activations cross the bus, and the NaN/inf count is taken on the device, where it
costs a reduction instead of a pass of the writer's CPU over every byte. On CPU there is nothing
to move: the captures are the host tensors and the writer counts non-finite values itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HostBatch:
    """One batch's captures, on the host once ``wait`` returns."""

    tensors: dict[str, torch.Tensor]
    #: NaN/inf count per floating-point capture, taken on the device (None: the writer counts)
    nonfinite: torch.Tensor | None = None
    counted: tuple[str, ...] = ()
    ready: torch.cuda.Event | None = None

    def wait(self) -> dict[str, int] | None:
        """Block until the copies have landed; returns the device-side NaN/inf counts, if any."""
        if self.ready is not None:
            self.ready.synchronize()
        if self.nonfinite is None:
            return None
        return dict(zip(self.counted, self.nonfinite.tolist()))


class HostTransfer:
    """Starts each batch's device-to-host copy on its own stream."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, captured: dict[str, torch.Tensor]) -> HostBatch:
        if self.stream is None:
            return HostBatch(captured)
        compute = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(compute)  # the captures are complete before they are read
        with torch.cuda.stream(self.stream):
            counted = tuple(name for name, t in captured.items() if t.is_floating_point())
            counts = (torch.stack([captured[n].numel() - torch.isfinite(captured[n]).sum() for n in counted])
                      if counted else torch.zeros(0, dtype=torch.long, device=compute.device))
            host = {}
            for name, t in captured.items():
                t.record_stream(self.stream)  # the allocator must not hand t to the next batch before the copy
                host[name] = _pinned_copy(t)
            host_counts = _pinned_copy(counts)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return HostBatch(host, host_counts, counted, ready)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
