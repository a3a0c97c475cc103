"""A real S3-compatible server for the tests (moto's threaded server on loopback) and a flaky proxy.

Not a mock of our own: ``moto.server.ThreadedMotoServer`` speaks the S3 HTTP API that obstore
talks to on a cloud. ``FlakyProxy`` sits between them and answers 503 to one request in ``every``
(moto has no fault injection), so the retries are exercised over real HTTP.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import os
import threading

ACCESS = {"AWS_ACCESS_KEY_ID": "harvestTESTkeyID", "AWS_SECRET_ACCESS_KEY": "harvestTESTsecretVALUE",
          "AWS_DEFAULT_REGION": "us-east-1"}


def start_server():
    """(server, endpoint URL): moto on 127.0.0.1, a free port."""
    for key, value in ACCESS.items():
        os.environ.setdefault(key, value)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


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


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to ``upstream`` and fails one request in ``every`` with 503."""

    def __init__(self, upstream: str, every: int = 5):
        host, port = upstream.removeprefix("http://").split(":")
        counter = itertools.count(1)
        self.failed = 0
        self.requests: list[str] = []  #: "GET /bucket/key" of every request
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append(f"{self.command} {self.path}")
                if next(counter) % every == 0:
                    proxy.failed += 1
                    msg = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_authenticating_server():
    """(process, endpoint): a second moto server, in its own process, that checks credentials
    (``INITIAL_NO_AUTH_ACTION_COUNT=0``: every request must be signed by a user it knows)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    return proc, endpoint
