"""Store locations on object storage: ``s3://bucket/prefix``, ``gs://…`` (and ``file://…``).

A store location is a plain path or a URL. URLs open through zarr's own ``zarr.storage.ObjectStore``
over ``obstore`` (chosen over ``FsspecStore``/``s3fs``: the same PUT throughput against a local S3
server, 73 vs 70 MiB/s, but no event loop of its own to bind to — the writer awaits the store on
one loop per write thread — and retries with bounded backoff built in; bench/RESULTS.md).

Credentials come from the environment or the provider's usual files only (``AWS_ACCESS_KEY_ID``,
``GOOGLE_APPLICATION_CREDENTIALS`` …), never from the spec: ``store.storage_options`` carries the
endpoint and region (``configure``), and ``check_access`` refuses any other key. Nothing here logs
or records a credential.

Crash safety without rename: a shard is uploaded whole (``put_object``), the manifest advances only
after every upload of a batch has succeeded, and a resume trusts the manifest alone. An object is
replaced atomically, so a reader sees the old shard or the new one, never a torn one:

* a shard up to ``multipart_threshold()`` bytes is one PUT;
* a larger one is a multipart upload: parts of ``part_bytes()`` uploaded ``PART_CONCURRENCY`` at a
  time (a cloud bucket gives each connection a fraction of the bandwidth, and a failed part is
  retried alone, not the whole shard). The object appears only when the upload is completed; an
  upload that fails is aborted by the client (obstore), so it leaves no object and no parts. A
  process killed mid-upload cannot abort: its parts stay invisible until the bucket's lifecycle rule
  (``AbortIncompleteMultipartUpload``) deletes them, and the resume uploads the shard again.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import ObjectStoreAccessError, SpecError, StoreError

#: URL schemes opened as object stores
SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs")
#: the keys ``store.storage_options`` may hold: where the service is, never who you are
ALLOWED_OPTIONS = ("endpoint", "region", "allow_http", "virtual_hosted_style_request")
#: transient errors (5xx, throttling, timeouts) are retried this many times, with backoff, then fail
RETRIES = 8
#: shards larger than this go up as a multipart upload (``HARVEST_MULTIPART_MIB`` overrides)
MULTIPART_THRESHOLD = 16 * 2**20
#: size of each part but the last (``HARVEST_PART_MIB`` overrides); S3 refuses parts under 5 MiB but the last
PART_BYTES = 8 * 2**20
#: parts of one shard in flight at once
PART_CONCURRENCY = 8
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")
_options: dict[str, dict[str, Any]] = {}  #: bucket URL -> storage options (``configure``)


def normalize(location: str | Path) -> str | Path:
    """A URL as a string (``Path("s3://b/x")`` collapses ``//``: undone here), a path as a ``Path``."""
    text = _URL.sub(r"\1://", str(location))
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    return text if is_url(text) else Path(location)


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names an object store (not a local path, nor ``file://``)."""
    text = _URL.sub(r"\1://", str(location))
    return "://" in text and text.split("://", 1)[0].lower() in SCHEMES


def bucket_of(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def join(root: str, relative: str) -> str:
    """``root/relative`` for a URL root, refusing a ``relative`` that climbs out of the root."""
    if "://" in relative or relative.startswith("/"):
        raise SpecError(f"store.path {relative!r}: give a relative path under store.root {root!r}")
    clean = posixpath.normpath(relative)
    if clean in (".", "") or clean == ".." or clean.startswith("../"):
        raise SpecError(f"store.path {relative!r} is not a store inside store.root {root!r}; "
                        "give a relative path such as 'job.zarr' (no '..')")
    return f"{root.rstrip('/')}/{clean}"


def configure(url: str, options: dict[str, Any] | None) -> None:
    """Use ``options`` (``store.storage_options``: endpoint, region) for every store in ``url``'s bucket."""
    check_options(options or {})
    _options[bucket_of(url)] = dict(options or {})


def check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(ALLOWED_OPTIONS))
    if unknown:
        raise SpecError(f"store.storage_options: {', '.join(unknown)} not allowed (allowed: {', '.join(ALLOWED_OPTIONS)}); "
                        "credentials come from the environment (AWS_ACCESS_KEY_ID …) or the provider's files, "
                        "never from the spec")


def obstore_of(url: str, options: dict[str, Any] | None = None):
    """The ``obstore`` store for ``url`` (its path becomes the prefix), with bounded retries."""
    from obstore.store import from_url

    opts = dict(_options.get(bucket_of(url), {}) if options is None else options)
    client = {"timeout": "120s", "connect_timeout": "10s"}
    if url.split("://", 1)[0].lower() in ("gs", "gcs"):  # GCS names the endpoint base_url and has no region
        opts.pop("region", None)
        if "endpoint" in opts:
            opts["base_url"] = opts.pop("endpoint")
        endpoint = str(opts.get("base_url") or os.environ.get("GOOGLE_BASE_URL", ""))
    else:
        endpoint = str(opts.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL", ""))
    if opts.pop("allow_http", None) or endpoint.startswith("http://"):  # a local S3- or GCS-compatible server
        client["allow_http"] = True
    retry = {"max_retries": RETRIES, "retry_timeout": timedelta(minutes=5),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15),
                         "base": 2}}
    return from_url(url, config=opts or None, client_options=client, retry_config=retry)


def zarr_store(url: str, read_only: bool = False):
    """zarr's ``ObjectStore`` over ``url``."""
    from zarr.storage import ObjectStore

    return ObjectStore(obstore_of(url), read_only=read_only)


def multipart_threshold() -> int:
    """Bytes above which a shard is a multipart upload (``HARVEST_MULTIPART_MIB``, else ``MULTIPART_THRESHOLD``)."""
    return _mib_from_env("HARVEST_MULTIPART_MIB", MULTIPART_THRESHOLD)


def part_bytes() -> int:
    """Size of a multipart upload's parts (``HARVEST_PART_MIB``, else ``PART_BYTES``)."""
    return _mib_from_env("HARVEST_PART_MIB", PART_BYTES)


def _mib_from_env(name: str, default: int) -> int:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise SpecError(f"{name}={text!r}: give a positive number of MiB (e.g. 16), or unset it")
    return max(1, int(value * 2**20))


async def put_object(store, key: str, data) -> None:
    """Upload ``data`` (bytes-like) to ``key`` of an obstore ``store``: one PUT, or a multipart upload.

    Returns once the object is complete (so the caller may count its rows as durable); raises after
    bounded retries, leaving no object (a failed multipart upload is aborted by obstore).
    """
    import obstore
    from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError

    size = memoryview(data).nbytes
    try:
        if size <= multipart_threshold():
            await obstore.put_async(store, key, data, use_multipart=False)
        else:
            await obstore.put_async(store, key, data, use_multipart=True, chunk_size=part_bytes(),
                                    max_concurrency=PART_CONCURRENCY)
    except (PermissionDeniedError, UnauthenticatedError) as exc:
        raise ObjectStoreAccessError(
            f"upload of {key} refused ({_first_line(exc)}); the batches uploaded before it are kept: set "
            "credentials that may write there in the environment, then run again with --resume") from None
    except BaseError as exc:  # transient errors were retried (bounded) before this
        raise StoreError(f"upload of {key} failed ({_first_line(exc)}); the batches uploaded before it are kept: "
                         "fix the cause, then run again with --resume") from None


def is_object_store(store) -> bool:
    """Whether a zarr store is zarr's ``ObjectStore`` (writes are PUTs: no files, no rename)."""
    from zarr.storage import ObjectStore

    return isinstance(store, ObjectStore)


def exists(url: str, key: str = "zarr.json") -> bool:
    """Whether ``url/key`` is an object."""
    import obstore

    try:
        obstore.head(obstore_of(url), key)
        return True
    except FileNotFoundError:
        return False


def any_object(url: str) -> bool:
    """Whether anything at all lies under ``url``."""
    import obstore

    for chunk in obstore.list(obstore_of(url), chunk_size=1):
        return bool(chunk)
    return False


def object_sizes(url: str) -> list[tuple[int, str]]:
    """(size, key) of every object under ``url`` (``harvest inspect``'s stored bytes and object count)."""
    import obstore

    return [(int(meta["size"]), meta["path"]) for chunk in obstore.list(obstore_of(url)) for meta in chunk]


def remove_objects(url: str, keys: list[str]) -> None:
    """Delete these objects under ``url`` (keys relative to it); a missing one is no error."""
    import obstore
    from obstore.exceptions import NotFoundError

    store = obstore_of(url)
    try:
        obstore.delete(store, keys)
    except (NotFoundError, FileNotFoundError):  # some services refuse a missing key: one by one, then
        for key in keys:
            try:
                obstore.delete(store, key)
            except (NotFoundError, FileNotFoundError):
                pass


def remove_prefix(url: str) -> None:
    """Delete every object under ``url`` (a store being replaced)."""
    import obstore

    store = obstore_of(url)
    for chunk in obstore.list(store, chunk_size=1000):
        obstore.delete(store, [meta["path"] for meta in chunk])


def check_access(url: str) -> None:
    """Write, read and delete one small object under ``url``, or raise a one-line ``ObjectStoreAccessError``.

    Called before any compute: a bucket that does not exist or refused credentials fail here, with the
    bucket and the fix named, not after the model is loaded. Transient errors are retried first.
    """
    import obstore
    from obstore.exceptions import BaseError, NotFoundError, PermissionDeniedError, UnauthenticatedError

    bucket = bucket_of(url)
    probe = f".harvest-access-check.{uuid.uuid4().hex}"
    try:
        store = obstore_of(url)
        obstore.put(store, probe, b"ok")
        obstore.delete(store, probe)
    except (PermissionDeniedError, UnauthenticatedError) as exc:
        raise ObjectStoreAccessError(
            f"{bucket}: access denied ({_first_line(exc)}); set credentials that may write there in the "
            "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)"
        ) from None
    except (NotFoundError, FileNotFoundError) as exc:
        raise ObjectStoreAccessError(
            f"{bucket}: no such bucket ({_first_line(exc)}); create it or fix store.root"
        ) from None
    except (BaseError, OSError, ValueError) as exc:
        text = _first_line(exc)
        if "NoSuchBucket" in str(exc):
            raise ObjectStoreAccessError(f"{bucket}: no such bucket; create it or fix store.root") from None
        if any(word in str(exc) for word in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
            raise ObjectStoreAccessError(
                f"{bucket}: access denied; set credentials that may write there in the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)") from None
        raise ObjectStoreAccessError(
            f"{bucket}: cannot write there ({text}); check store.root and store.storage_options "
            "(endpoint, region)") from None


def _first_line(exc: BaseException) -> str:
    """An error's first line, with anything that looks like a credential cut out."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return re.sub(r"(?i)(key|secret|token|signature|credential)[^,;\s]*[=:]\s*\S+", r"\1=…", line)[:300]
