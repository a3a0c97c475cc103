"""Data-parallel replicas of the pipeline: R copies of its stage actors harvest different units at once.

Each replica is a full pipeline (``run.stages`` ``PipelineStage`` actors, the same class a one-replica
pipeline runs). The driver owns the rest:

- **units**: the job's batches are cut into units that own whole shards of every array
  (``harvest.shape.job_units``), so no shard is ever written by two replicas, and batch k still
  lands in the rows the layout gives it: the store is byte-identical to R = 1;
- **dispatch**: one driver thread per replica pulls the next unit from a shared queue when its
  replica has finished the last one, so a slow replica does not hold the others back; within a
  unit, batches flow stage to stage as object references, at most ``run.max_in_flight`` at once;
- **manifest**: the driver (one process) marks a unit's batches in every stage's ``_progress``
  array once every stage of the replica has the unit on disk, rows and statistics snapshot (each
  stage's writer accumulates a unit's statistics from nothing); ``--resume`` then redoes the units
  not fully marked, with any R (and the in-process or one-replica paths read the same manifest);
- **statistics**: after marking a unit, the driver folds the units done without a gap into the
  prefix snapshot in unit order (``harvest.statistics.compact_statistics``), so the statistics are
  bit-identical for any R and the store keeps one prefix plus the units finished out of order;
- **failures**: a replica whose actor dies (killed, segfault) has it restarted by Ray and redoes
  its unit from the unit's first batch (rows are rewritten with the same bytes); a replica that
  cannot be restarted, or whose unit fails twice in a row, is dropped with a warning naming it and
  its unit goes back to the queue for the others; the job fails only when every replica is gone.
  A stage's own error (non-finite values, out of memory, a store error) stops the job as it does
  with one replica: it would happen on any replica;
- **placement**: one placement group with one bundle per replica, sized for all its stages
  (``replica_bundle``), and the ``SPREAD`` strategy. A bundle is always on one node, so a replica's
  stages share a node and its hidden states stay in that node's object store (what ``STRICT_PACK``
  per replica gave), while ``SPREAD`` puts the replicas' bundles on distinct nodes as evenly as the
  cluster allows, so their GPUs, CPUs and disks add up. Ray has no spread across placement groups;
  its one per-group node hint, ``_soft_target_node_id``, is private and experimental. On a one-node
  Ray every bundle lands on that node.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from harvest.errors import ReplicaLost, StageError
from harvest.statistics import Compactor
from harvest.shape import (Resources, cluster_capacity, job_units, local_ray_cpus, missing_resources,
                           stage_resources)
from harvest.store import mark_written, open_for_writing, open_group, undone_units
from harvest.writer import remove_unfinished_writes

from .pipeline import _LOST, _OOM, START_TIMEOUT_S, PipelineStage, RaySession, _first_line, _permanent, alive_nodes

log = logging.getLogger("harvest.replicas")

#: failures of one unit in a row after which a replica counts as one that keeps dying
UNIT_ATTEMPTS = 2


@dataclass
class Replica:
    """One copy of the pipeline: its stage actors, and what it has done."""

    index: int
    actors: list
    pids: list[int] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  #: Ray node id of each stage
    restarts: int = 0
    units: int = 0
    tokens: int = 0
    seconds: float = 0.0
    alive: bool = True

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class ReplicaDriver:
    """Hands units to replicas and keeps the manifest (see the module doc)."""

    def __init__(self, job, on_batch: Callable[[int, int, ReplicaDriver], None] | None = None):
        self.job = job
        self.on_batch = on_batch
        self.n = len(job.stages)
        self.max_in_flight = job.spec.run.max_in_flight or 2 * self.n
        self.replicas: list[Replica] = []
        self.queue: deque[tuple[int, int]] = deque()
        self.lock = threading.Lock()  #: the manifest, the counters
        self.compacting = threading.Lock()  #: one compaction of the statistics at a time
        self.compactor: Compactor | None = None  #: the statistics' compactions (once the store is open)
        self.changed = threading.Condition()  #: the queue of units, ``busy``
        self.busy = 0  #: replicas working on a unit
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.group = None  #: the store's zarr group (the manifest)
        self.placement = None  #: the placement group: one bundle per replica
        self.nonfinite: dict[str, int] = {}  #: NaN/inf counts of the units marked durable, per array

    # -- resources and actors --
    def resources(self) -> Resources:
        nodes = alive_nodes()
        node_cpus, gpus = cluster_capacity(nodes)
        return stage_resources(self.job.spec, node_cpus=node_cpus, gpus=gpus, nodes=max(1, len(nodes)))

    def start(self, resources: Resources) -> None:
        job = self.job
        cpus, gpus, r = resources.cpus_per_stage, resources.gpus_per_stage, resources.replicas
        short = missing_resources(resources, ray.cluster_resources())
        if short:
            raise StageError(f"{'; '.join(short)} in the Ray cluster; lower run.replicas, run.threads or run.stages, "
                             "or use a bigger cluster (run.address)")
        self.remove_unfinished_writes()  # before any writer starts: no write of this run is in flight yet
        options = dataclasses.replace(job.stage_options(), threads=cpus, **({"device": "cuda"} if gpus else {}))
        remote = ray.remote(PipelineStage)
        name = f"harvest-{job.spec.name}-{os.getpid()}-{time.time_ns() % 10**9}"
        bundle = replica_bundle(resources)
        # one bundle per replica, holding all its stages: a bundle sits on one node, so a replica's hidden
        # states stay in that node's object store; SPREAD puts the bundles on distinct nodes where it can
        self.placement = placement_group([dict(bundle) for _ in range(r)], strategy="SPREAD", name=name)
        for j in range(r):
            actors = [
                remote.options(
                    name=f"{name}-r{j}-stage{stage.index}", num_cpus=cpus, num_gpus=gpus,
                    max_restarts=job.spec.run.max_restarts, max_task_retries=0, max_concurrency=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=j),
                ).remote(job.ckpt, stage, options, dataclasses.replace(job.stage_info(stage), shared=True, compacts=False),
                         job.layout.n_batches)
                for stage in job.stages]
            self.replicas.append(Replica(j, actors))
        ready, _ = ray.wait([self.placement.ready()], timeout=START_TIMEOUT_S)
        if not ready:
            raise StageError(f"{r} replicas could not be placed within {START_TIMEOUT_S:.0f} s: each needs {bundle} on "
                             "one node (all its stages); lower run.replicas or run.threads, or use a bigger cluster")
        for rep in self.replicas:
            try:
                positions = self._all(rep, "ready")
            except ReplicaLost as exc:
                raise StageError(f"replica {rep.index} could not start: {exc}") from None
            rep.pids = [p["pid"] for p in positions]

    def remove_unfinished_writes(self) -> None:
        """Temporary shard files of writes that never finished (a killed actor's); only while no replica writes."""
        for stage in self.job.stages:
            for p in stage.hooks:
                remove_unfinished_writes(f"{self.job.path}/{p.name}")

    def stop(self) -> None:
        for rep in self.replicas:
            for actor in rep.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        if self.placement is not None:
            try:
                remove_placement_group(self.placement)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _all(self, rep: Replica, method: str, *args) -> list:
        """Call ``method`` on every stage of ``rep``; waits through restarts; a stage's own error is raised."""
        deadline = time.monotonic() + START_TIMEOUT_S
        refs = [getattr(a, method).remote(*args) for a in rep.actors]
        out = []
        for i, actor in enumerate(rep.actors):
            while True:
                ready, _ = ray.wait([refs[i]], timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise ReplicaLost(f"stage {i} did not answer {method} within {START_TIMEOUT_S:.0f} s")
                try:
                    out.append(ray.get(refs[i]))
                    break
                except ActorUnavailableError:
                    time.sleep(0.2)  # being restarted: ask again
                    refs[i] = getattr(actor, method).remote(*args)
                except RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    if isinstance(cause, (RayActorError, *_LOST)):
                        raise ReplicaLost(f"stage {i}: {_first_line(str(cause))}") from None
                    raise _permanent(cause, i, self.job.stages[i]) from None
                except RayActorError as exc:
                    raise ReplicaLost(f"stage {i} died and could not be restarted (run.max_restarts: "
                                      f"{self.job.spec.run.max_restarts}): {_first_line(str(exc))}") from None
        return out

    # -- one unit on one replica --
    def run_unit(self, rep: Replica, unit: tuple[int, int]) -> dict[str, int] | None:
        """Harvest ``unit`` on ``rep``, redone from its start after a lost actor; returns the unit's NaN/inf
        counts per array, None when stopped."""
        for attempt in range(UNIT_ATTEMPTS):
            placed = self._all(rep, "begin", unit[0])
            pids = [p["pid"] for p in placed]
            if rep.pids and pids != rep.pids:
                rep.restarts += 1
            rep.pids, rep.nodes = pids, [p["node"] for p in placed]
            try:
                if not self._stream(rep, unit):
                    return None
                ended = self._all(rep, "end_unit")
                if [e["pid"] for e in ended] != rep.pids:
                    # an actor restarted during the unit: the new one holds none of the unit's rows
                    raise ReplicaLost(f"a stage restarted during the unit (processes {rep.pids} -> "
                                      f"{[e['pid'] for e in ended]})")
                counts: dict[str, int] = {}
                for e in ended:
                    for name, v in e["nonfinite"].items():
                        counts[name] = counts.get(name, 0) + v
                return counts
            except ReplicaLost as exc:
                log.warning("replica %d lost an actor in batches %d..%d (%s); redoing the unit from its start",
                            rep.index, unit[0], unit[1] - 1, exc)
        raise ReplicaLost(f"batches {unit[0]}..{unit[1] - 1} failed {UNIT_ATTEMPTS} times in a row")

    def _stream(self, rep: Replica, unit: tuple[int, int]) -> bool:
        layout = self.job.layout
        window: deque[tuple[int, list]] = deque()  #: (batch, status refs of its stages)
        k = unit[0]
        while k < unit[1] or window:
            if self.stop_event.is_set():
                return False
            if k < unit[1] and len(window) < self.max_in_flight:
                hidden, statuses = None, []
                for actor in rep.actors:
                    status, hidden = actor.run.remote(layout.batch(k), hidden)
                    statuses.append(status)
                window.append((k, statuses))
                k += 1
                continue
            batch, statuses = window[0]
            ready, _ = ray.wait([statuses[-1]], timeout=0.5)
            if not ready:
                continue
            window.popleft()
            try:
                self._settle(statuses)
            except ReplicaLost:
                rest = [s for _, ss in window for s in ss]
                if rest:  # let the calls in flight settle before the unit is begun again
                    ray.wait(rest, num_returns=len(rest))
                raise
            t = layout.tokens_before(batch + 1) - layout.tokens_before(batch)
            with self.lock:
                rep.tokens += t
                self.bar_update += t
            if self.on_batch is not None:
                self.on_batch(rep.index, batch, self)
        return True

    def _settle(self, statuses: list) -> None:
        ray.wait(statuses, num_returns=len(statuses))
        for i, ref in enumerate(statuses):
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - classified here
                cause = exc.cause if isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None else exc
                if isinstance(cause, ray.exceptions.OutOfMemoryError) or (
                        isinstance(cause, RayActorError) and _OOM.search(str(cause))):
                    raise StageError(f"stage {i} ({self.job.stages[i].describe()}) was killed for running out of "
                                     "memory; lower run.batch_size, run.max_in_flight or run.replicas, or use more "
                                     f"stages (see `harvest plan`). Ray said: {_first_line(str(cause))}") from None
                if isinstance(cause, (RayActorError, *_LOST)):
                    raise ReplicaLost(f"stage {i}: {_first_line(str(cause))}") from None
                raise _permanent(cause, i, self.job.stages[i]) from None

    # -- dispatch --
    def _take(self) -> tuple[int, int] | None:
        """The next unit; None when none is left. While another replica still works on one, a free
        replica waits: that unit comes back to the queue if its replica is dropped."""
        with self.changed:
            while not self.queue and self.busy and not self.stop_event.is_set():
                self.changed.wait(0.5)
            if not self.queue or self.stop_event.is_set():
                return None
            self.busy += 1
            return self.queue.popleft()

    def _serve(self, rep: Replica) -> None:
        while (unit := self._take()) is not None:
            t0, tokens0 = time.perf_counter(), rep.tokens
            try:
                finished = self.run_unit(rep, unit)
            except ReplicaLost as exc:
                rep.alive = False
                rep.tokens = tokens0
                log.warning("replica %d dropped: %s; its units go to the other replicas", rep.index, exc)
                for actor in rep.actors:  # nothing of it may write any more
                    try:
                        ray.kill(actor, no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                self._release(unit)
                return
            except BaseException as exc:  # noqa: BLE001 - a stage's own error stops the job
                self.error = self.error or exc
                self.stop_event.set()
                self._release(None)
                return
            try:
                if finished is not None:
                    self._finish(rep, unit, finished, t0)
            except BaseException as exc:  # noqa: BLE001 - the store refused the mark: stop the job, never hang it
                self.error = self.error or exc
                self.stop_event.set()
                self._release(None)
                return
            self._release(None if finished is not None else unit)

    def _finish(self, rep: Replica, unit: tuple[int, int], finished: dict[str, int], t0: float) -> None:
        """Mark a unit every stage wrote (its statistics snapshots first: the writers wrote them before
        returning), count its NaN/inf, and fold finished units into the statistics prefix."""
        with self.lock:
            for i in range(self.n):
                mark_written(self.group, i, unit[1], start=unit[0])
            for name, v in finished.items():
                self.nonfinite[name] = self.nonfinite.get(name, 0) + v
            rep.units += 1
            rep.seconds += time.perf_counter() - t0
        if self.job.spec.capture.statistics:
            with self.compacting:  # fold the units done without a gap into the prefix snapshot
                self.compactor.unit_done()

    def _release(self, unit: tuple[int, int] | None) -> None:
        """A replica is done with a unit; ``unit``: one to hand to another replica."""
        with self.changed:
            self.busy -= 1
            if unit is not None:
                self.queue.appendleft(unit)
            self.changed.notify_all()

    def run(self, units: list[tuple[int, int]], bar=None) -> dict[str, int]:
        self.queue.extend(units)
        self.group = open_for_writing(self.job.path)
        self.compactor = Compactor(self.group)
        self.bar_update = 0
        threads = [threading.Thread(target=self._serve, args=(rep,), name=f"replica{rep.index}", daemon=True)
                   for rep in self.replicas]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.2)
                self._show(bar)
                if self.error is None and not any(rep.alive for rep in self.replicas):
                    break
        except BaseException:  # an interrupt: the threads stop at their next batch; done units stay marked
            self.stop_event.set()
            for t in threads:
                t.join(10)
            raise
        self._show(bar)
        if self.error is not None:
            raise self.error
        if self.queue:
            raise StageError(f"every replica is gone (all {len(self.replicas)} dropped, see the warnings above); "
                             f"{len(self.queue)} unit(s) left undone. Run again with --resume")
        for rep in self.replicas:
            log.info("replica %d: %d unit(s), %d tokens, %.0f tok/s, %d restart(s), nodes %s", rep.index, rep.units,
                     rep.tokens, rep.tokens_per_second, rep.restarts, sorted(set(rep.nodes)))
        for rep in self.replicas:
            if rep.alive:
                self._all(rep, "close")
        self.remove_unfinished_writes()  # every writer has closed: what is left is a killed actor's
        # the job's counts, summed over the units this run marked (a redone unit counts once; a dropped
        # replica's finished units still count): each array's attribute holds the total, not one replica's
        for name, v in self.nonfinite.items():
            self.group[name].attrs["nonfinite_values"] = v
        return dict(self.nonfinite)

    def _show(self, bar) -> None:
        if bar is None:
            return
        with self.lock:
            update, self.bar_update = self.bar_update, 0
        bar.update(update)
        rates = " ".join(f"r{rep.index} {rep.tokens_per_second:,.0f}" if rep.alive else f"r{rep.index} dropped"
                         for rep in self.replicas)
        bar.set_postfix_str(f"tok/s {rates}", refresh=False)


def replica_bundle(resources: Resources) -> dict[str, float]:
    """One replica's placement bundle: every stage's CPUs and GPUs, so its stages share a node."""
    n = resources.stages
    return {"CPU": float(n * resources.cpus_per_stage),
            **({"GPU": float(n * resources.gpus_per_stage)} if resources.gpus_per_stage else {})}


def run_replicas(job, progress: bool, *, on_batch=None, started: Callable[[ReplicaDriver], None] | None = None
                 ) -> dict[str, int]:
    """Run ``job``'s undone units on ``run.replicas`` copies of its pipeline; returns non-finite counts.

    ``on_batch(replica, k, driver)`` is called after batch k leaves a replica's last stage (tests use it
    to kill actors mid-run).
    """
    spec = job.spec
    units = undone_units(open_group(job.path), job_units(job.layout, job.arrays))
    replicas = spec.run.replicas if isinstance(spec.run.replicas, int) else 1
    local_cpus = local_ray_cpus(spec, len(job.stages), replicas)
    driver = ReplicaDriver(job, on_batch)
    layout = job.layout
    with RaySession(spec.run.address, local_cpus, spec.run.dashboard):
        resources = driver.resources()
        left = sum(layout.tokens_before(b) - layout.tokens_before(a) for a, b in units)
        total = layout.tokens_before(layout.n_batches)
        bar = tqdm(total=total, initial=total - left, unit="tok", unit_scale=True,
                   desc=f"harvest {spec.name} ({resources.replicas} replicas x {len(job.stages)} stages)",
                   disable=not progress)
        try:
            driver.start(resources)
            if started is not None:
                started(driver)
            return driver.run(units, bar)
        finally:
            bar.close()
            driver.stop()
