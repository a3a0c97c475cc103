"""``harvest submit``: a spec becomes a Ray job whose entrypoint is ``python -m cluster.entrypoint``.

What a submitted job is:

- its **working directory** holds only the spec (``spec.yaml``, as written); relative paths in the
  spec are read from the directory ``submit`` was called in (``base_dir``), which must therefore
  exist on the cluster too (a shared filesystem mounted at the same path), or the spec gives
  absolute paths;
- its **code**: by default this machine's ``harvest``, ``sharding``, ``analysis`` and ``cluster``
  packages travel as ``py_modules`` (the cluster's Python needs only the dependencies: torch,
  transformers, zarr, ray ...); ``ship_code=False`` when the cluster's image has harvest installed;
- its **entrypoint** names the interpreter (a bare ``python`` on a node's PATH may not be the one
  with Ray, see GOTCHAS): this interpreter when the cluster runs on this machine (a loopback
  address), else ``python`` unless ``python=`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harvest.errors import ClusterError, HarvestError, SpecError, StoreNotWritableError
from harvest.runner import check_selection
from harvest.shape import estimate_workload, job_hooks
from harvest.spec import load_spec
from harvest.objstore import is_url
from harvest.store import is_store, read_progress

from sharding.plan import build_plan, planning_checkpoint

from .connection import connect, dashboard_url, first_line, is_local
from .progress import Progress
from .protocol import READY_TAG, parse_error, rebuild_error
from .resources import check_resources, cluster_nodes, entrypoint_resources, job_needs, total
from .state import META_SPEC, META_STAGES, META_STORAGE, META_STORE, TERMINAL, job_info, logs_text

#: the packages of this project, shipped to the cluster as py_modules unless ship_code=False
PACKAGES = ("harvest", "sharding", "analysis", "cluster")
EXCLUDES = ["__pycache__", "*.pyc", "*.zarr"]
SPEC_FILE = "spec.yaml"


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    address: str
    store: str
    entrypoint: str
    #: the job's state when ``submit`` returned (RUNNING once the job checked its store)
    state: str
    runtime_env: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    #: progress already in the store (a resumed job), when the store is readable from here
    resumes_from: Progress | None = None




def check_store_root(root: str | None) -> str | None:
    """Refuse store roots the stage writers cannot write; ``file://`` becomes a path.

    An object-store root (``s3://``, ``gs://``: ``harvest.objstore``) passes: every node writes its
    shards there directly, so no shared file system is needed (credentials come from each node's
    environment). Other URL schemes are refused.
    """
    if root is None:
        return None
    parsed = urlparse(root)
    if parsed.scheme == "file":
        return parsed.path
    if is_url(root):
        return root
    if parsed.scheme and "://" in root:
        raise StoreNotWritableError(
            f"store root {root!r} is an object-store URL; the stages write their shards through a filesystem "
            "path that every node of the cluster sees: use a shared filesystem (NFS, EFS, Filestore, Lustre) or "
            "mount the bucket at the same path on every node (gcsfuse; mountpoint-s3 with --allow-overwrite "
            "--allow-delete) and pass that path. Reading a store back from the bucket with zarr/xarray needs "
            f"the fsspec extra for it ({_FSSPEC_EXTRAS.get(parsed.scheme, 'the fsspec implementation')})")
    return root


_FSSPEC_EXTRAS = {"s3": "pip install s3fs", "s3a": "pip install s3fs", "gs": "pip install gcsfs",
                  "gcs": "pip install gcsfs", "az": "pip install adlfs", "abfs": "pip install adlfs"}



# --- submit ----------------------------------------------------------------------------------------

def default_python(url: str) -> str:
    """This interpreter for a cluster on this machine; ``python`` on the nodes' PATH otherwise."""
    return sys.executable if is_local(url) else "python"


def code_modules() -> list[str]:
    """Directories of this project's packages, as ``py_modules`` for the job's runtime environment."""
    out = []
    for name in PACKAGES:
        found = importlib.util.find_spec(name)
        if found is not None and found.submodule_search_locations:
            out.append(str(Path(list(found.submodule_search_locations)[0]).resolve()))
    return out


def build_runtime_env(workdir: str, runtime_env: dict[str, Any] | None, ship_code: bool) -> dict[str, Any]:
    env = dict(runtime_env or {})
    if "working_dir" in env:
        raise SpecError("runtime_env.working_dir is set by harvest submit (it carries the spec); ship your own "
                        "files with py_modules, or put them on a filesystem the cluster mounts")
    env["working_dir"] = workdir
    if ship_code:
        env["py_modules"] = [*code_modules(), *env.get("py_modules", [])]
    env["excludes"] = [*EXCLUDES, *env.get("excludes", [])]
    env["env_vars"] = {"TOKENIZERS_PARALLELISM": "false", **env.get("env_vars", {})}
    return env


def entrypoint(python: str, *, base_dir: Path, store_root: str, resume: bool, overwrite: bool,
               progress_every: float) -> str:
    args = [python, "-m", "cluster.entrypoint", SPEC_FILE, "--base-dir", str(base_dir), "--store-root", store_root,
            "--resume" if resume else "--no-resume", "--progress-every", f"{progress_every:g}"]
    if overwrite:
        args.append("--overwrite")
    return " ".join(shlex.quote(a) for a in args)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "job"


def submit(spec_path: str | Path, address: str | None = None, *, resume: bool = True, overwrite: bool = False,
           store_url: str | None = None, runtime_env: dict[str, Any] | None = None, python: str | None = None,
           ship_code: bool = True, check_cluster: bool = True, wait_s: float = 60.0, base_dir: str | Path | None = None,
           progress_every: float = 10.0, dry_run: bool = False) -> SubmittedJob:
    """Submit a harvest job to the Ray cluster at ``address`` (or $RAY_ADDRESS); see the module doc.

    ``store_url``: the store root on the cluster (a path every node sees; replaces the spec's
    ``store.root``). ``resume`` (default) continues a store that already has progress when its
    fingerprint matches; ``overwrite`` replaces it. ``wait_s``: how long to wait for the job to
    check its store, so that an unwritable store or a broken environment fails here (0: return at
    once). ``dry_run``: validate and build the submission, contact nothing.
    """
    if resume and overwrite:
        raise SpecError("resume and overwrite exclude each other; pick one")
    base = Path(base_dir or os.getcwd()).resolve()
    spec = load_spec(spec_path, base_dir=base, store_root=check_store_root(store_url))
    root = check_store_root(spec.store.root)
    if root != spec.store.root:  # a file:// URL in the spec
        spec = load_spec(spec_path, base_dir=base, store_root=root)
    store = spec.store_path()  # inside the store root: ``harvest.spec.confine``
    warnings = []
    unchecked = check_locally(spec)  # a typo is an error here, not a job that fails on the cluster
    if unchecked:
        warnings.append(unchecked)
    if spec.model.device == "auto" and spec.run.stages > 1:
        warnings.append("model.device is 'auto': a pipeline's stages take GPUs only when the node running its "
                        "driver has one; set model.device: cuda to put every stage on a GPU")
    given = address or os.environ.get("RAY_ADDRESS")
    url = dashboard_url(given) if given else ""
    client = None
    needs = job_needs(spec)
    if not dry_run:
        client, url = connect(address)
        check_no_other_writer(client, str(store))
        if check_cluster:
            try:
                nodes = cluster_nodes(url)
            except Exception as exc:  # noqa: BLE001 - an old dashboard without the state API
                warnings.append(f"could not read the cluster's resources ({first_line(str(exc))}); not checked")
            else:
                needs = job_needs(spec, nodes)
                check_resources(needs, total(nodes), url, len(nodes))
    py = python or os.environ.get("HARVEST_CLUSTER_PYTHON") or default_python(url or "http://127.0.0.1")
    on_cluster = root if is_url(root) else str(spec.resolve(root))
    command = entrypoint(py, base_dir=base, store_root=on_cluster, resume=resume, overwrite=overwrite,
                         progress_every=progress_every)
    resumes_from = None
    # a dry run contacts nothing, an object store included; a store this machine cannot read is not an error
    if resume and not (dry_run and is_url(store)):
        try:
            p = read_progress(store) if is_store(store) else None
        except (HarvestError, OSError, ValueError):
            p = None
        if p is not None and p.batches_done:
            resumes_from = Progress(p.batches_done, p.n_batches, p.tokens_done, p.tokens_total)
    workdir = tempfile.mkdtemp(prefix="harvest-submit-")
    try:
        shutil.copyfile(spec_path, Path(workdir) / SPEC_FILE)
        env = build_runtime_env(workdir, runtime_env, ship_code)
        job_id = f"harvest-{_slug(spec.name)}-{uuid.uuid4().hex[:8]}"
        if dry_run:
            return SubmittedJob(job_id, url, str(store), command, "DRY-RUN", env, tuple(warnings), resumes_from)
        client.submit_job(
            entrypoint=command, submission_id=job_id, runtime_env=env,
            metadata={META_SPEC: spec.name, META_STORE: str(store), META_STAGES: str(spec.run.stages),
                      META_STORAGE: json.dumps(spec.store.storage_options)},
            **entrypoint_resources(needs),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    state = _await_start(client, job_id, wait_s, py, ship_code) if wait_s > 0 else "PENDING"
    return SubmittedJob(job_id, url, str(store), command, state, env, tuple(warnings), resumes_from)


def check_locally(spec) -> str | None:
    """Check hooks, layers, heads, neurons and stages against the model's config.json before submitting.

    Needs only the config (as ``harvest plan``); when the model is not readable from here (a path
    that exists only on the cluster, a hub name), returns a warning and the job checks it itself.
    """
    if not (spec.resolve(spec.model.path) / "config.json").is_file():
        return (f"model {spec.model.path} has no config.json here; its hooks and stages are checked when the job "
                "starts on the cluster")
    ckpt = planning_checkpoint(spec)
    check_selection(spec, ckpt)
    build_plan(ckpt, job_hooks(spec, ckpt.arch, ckpt.n_layers), spec, estimate_workload(spec, "checked before submitting"))
    return None


def check_no_other_writer(client, store: str) -> None:
    """Refuse a second job on a store that an unfinished job writes: their writers would share shards."""
    for other in client.list_jobs():
        if (other.metadata or {}).get(META_STORE) == store and str(other.status) not in TERMINAL:
            job = other.submission_id or other.job_id
            raise ClusterError(
                f"job {job} ({other.status}) is writing {store} already; two jobs writing one store would lose "
                f"rows. Wait for it (`harvest status {job} --watch`) or stop it (`harvest stop {job}`), then "
                "submit again: the store resumes where it stopped")


def _await_start(client, job_id: str, wait_s: float, python: str, ship_code: bool) -> str:
    """Wait until the job has checked its store (or ended, or ``wait_s`` passed); raise its early failure."""
    deadline = time.monotonic() + wait_s
    while True:
        info = job_info(client, job_id)
        state = str(info.status)
        text = logs_text(client, job_id) if state != "PENDING" else ""
        if state == "FAILED":
            raise _early_failure(job_id, text, info.message or "", python, ship_code)
        if state in TERMINAL or READY_TAG in text or time.monotonic() >= deadline:
            return state
        time.sleep(0.5)


def _early_failure(job_id: str, log_text: str, message: str, python: str, ship_code: bool) -> HarvestError:
    found = parse_error(log_text)
    if found is not None:
        return rebuild_error(*found, suffix=f" (job {job_id} failed; `harvest logs {job_id}` shows its log)")
    tail = "; ".join(line for line in (log_text or message).strip().splitlines()[-3:])
    hint = ""
    if "No module named" in tail or "not found" in tail:
        hint = (f" The job's interpreter ({python}) lacks what harvest needs: pass --python with the cluster's "
                "Python that has torch, transformers, zarr and ray"
                + (", or install harvest in the cluster's image" if not ship_code else "") + ".")
    return ClusterError(f"job {job_id} failed before it started harvesting: {tail[-800:]}.{hint}"
                        f" `harvest logs {job_id}` shows its log")


