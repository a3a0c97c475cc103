"""Inside a submitted job: ``python -m cluster.entrypoint spec.yaml ...`` (``harvest submit`` starts it).

Checks that the store location is writable from this node, then runs
``harvest.runner.run(spec, resume=True)``, which resumes a store that already has progress when its
fingerprint matches (and refuses one that does not), while a thread prints progress lines to the
job's log (``cluster.protocol``). A ``HarvestError`` ends the job with an ``[harvest-error]`` line
that the client raises again as the same class.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

import harvest
from harvest.errors import HarvestError, Interrupted, StoreNotWritableError
from harvest.objstore import check_access, is_url
from harvest.runner import run
from harvest.spec import load_spec

from .progress import ProgressMonitor
from .protocol import READY_TAG, error_line


def check_writable(path: Path) -> None:
    """Create (if needed) and write a probe file where the store goes; raise a clear error if we cannot."""
    target = path if path.is_dir() else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".harvest-write-check-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        user = _user()
        raise StoreNotWritableError(
            f"the job cannot write its store at {path} on node {socket.gethostname()} "
            f"({exc.strerror or type(exc).__name__}: {exc.filename or target}); give --store-url a directory that "
            f"every Ray node can write (a shared filesystem mounted at the same path on every node) and check "
            f"that user {user} may write there") from None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return str(os.getuid())



def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Interrupted(signum)


def run_job(spec_file: str, *, base_dir: str, store_root: str | None, resume: bool, overwrite: bool,
            progress_every: float) -> int:
    """What a submitted job runs: check the store location, harvest, report progress to the log."""
    spec = load_spec(spec_file, base_dir=base_dir, store_root=store_root)
    path = spec.store_path()
    if is_url(path):  # an object store: no shared file system; a missing bucket or refused credentials fail here
        check_access(path)
    else:
        check_writable(path)
    print(f"{READY_TAG} " + json.dumps({"store": str(path), "node": socket.gethostname(), "python": sys.executable,
                                        "harvest": str(Path(harvest.__file__).parent), "resume": resume}), flush=True)
    monitor = ProgressMonitor(path, progress_every, replaced=overwrite)
    monitor.start()
    result = None
    try:
        result = run(spec, resume=resume, overwrite=overwrite, progress=False)
    finally:
        monitor.finish(result.tokens_per_second if result is not None else None)
    print(f"[harvest] harvested {result.tokens} tokens in {result.seconds:.1f} s "
          f"({result.tokens_per_second:,.0f} tokens/s) into {result.path}", flush=True)
    for name, count in result.nonfinite.items():
        print(f"[harvest] warning: {count} non-finite values stored in {name} (on_nonfinite: flag)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.entrypoint",
                                     description="Run a harvest job inside a Ray job (`harvest submit` starts it).")
    parser.add_argument("spec")
    parser.add_argument("--base-dir", default=".")
    parser.add_argument("--store-root", default=None)
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--progress-every", type=float, default=10.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # `harvest stop` (Ray sends SIGTERM) ends like Ctrl-C: the run writes what it computed, then we exit 143
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return run_job(args.spec, base_dir=args.base_dir, store_root=args.store_root, resume=args.resume,
                       overwrite=args.overwrite, progress_every=args.progress_every)
    except HarvestError as exc:
        print(error_line(exc), flush=True)
        return 2
    except Interrupted as exc:
        print(f"[harvest] stopped: {exc.message('submitting the same spec again')}", flush=True)
        return exc.exit_code
    except SystemExit as exc:
        # a handler that ray.init installed (should ours not be back in place) exits with the signal number
        if exc.code not in (signal.SIGTERM, -signal.SIGTERM):
            raise
        print("[harvest] stopped: the store keeps every batch written so far; submitting the spec again "
              "resumes it", flush=True)
        return 128 + signal.SIGTERM

if __name__ == "__main__":
    sys.exit(main())
