"""Where the cluster is: the Jobs API address, and a client that fails fast when nothing answers."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from ray.job_submission import JobSubmissionClient

from harvest.errors import ClusterError, ClusterUnreachableError

CONNECT_TIMEOUT_S = 10.0
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def dashboard_url(address: str | None = None) -> str:
    """The Jobs API URL: ``address``, else $RAY_ADDRESS; ``HOST:PORT`` means ``http://HOST:PORT``."""
    given = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not given:
        raise ClusterUnreachableError(
            "no cluster address: pass --address http://HOST:8265 (the Ray dashboard, which serves the Jobs "
            "API; http://127.0.0.1:8265 for a cluster on this machine) or set RAY_ADDRESS to it")
    if given.startswith("ray://"):
        raise ClusterUnreachableError(
            f"{given} is a Ray Client address; jobs are submitted through the Jobs API on the head node's "
            "dashboard: use http://HOST:8265")
    url = given if "://" in given else f"http://{given}"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClusterUnreachableError(f"cannot read {given!r} as a Jobs API address; use http://HOST:8265")
    return url.rstrip("/")


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def is_local(url: str) -> bool:
    return _host_port(url)[0] in LOOPBACK


def _unreachable(url: str, why: str) -> ClusterUnreachableError:
    return ClusterUnreachableError(
        f"no Ray cluster answers at {url} ({why}). Check that the head node runs (`ray status` on it), that "
        "its dashboard listens at that host and port (`ray start --head --dashboard-host=127.0.0.1 "
        "--dashboard-port=8265`; the Jobs API is the dashboard's port, 8265 by default, not the GCS port "
        "6379), and that this machine reaches it, e.g. through `ssh -L 8265:127.0.0.1:8265 HEAD` or "
        "`kubectl port-forward svc/CLUSTER-head-svc 8265:8265`")


def connect(address: str | None = None):
    """A ``JobSubmissionClient`` for ``address`` (or $RAY_ADDRESS), and the URL it talks to."""
    url = dashboard_url(address)
    host, port = _host_port(url)
    try:  # fail fast: the client itself would wait for a TCP timeout on an unroutable host
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise _unreachable(url, exc.strerror or type(exc).__name__) from None
    try:
        client = JobSubmissionClient(url)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, requests' errors
        if type(exc).__name__ == "AuthenticationError":
            raise ClusterError(
                f"the cluster at {url} uses Ray's token authentication and refused this client: set RAY_AUTH_TOKEN "
                "(or RAY_AUTH_TOKEN_PATH) to the cluster's token, which `ray start` wrote on the head node "
                f"(~/.ray/auth_token). Ray said: {first_line(str(exc))}") from None
        raise _unreachable(url, first_line(str(exc)) or type(exc).__name__) from None
    return client, url


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else ""

