"""Where campaign files live: a local path, or any URI ``pyarrow.fs.FileSystem.from_uri``
accepts (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``). Torch-free and Ray-free.

A *location* is a local path (``str`` or ``Path``) or a URI string. Local paths behave as
plain files always did (writes go through a temporary file and a rename); on object stores
a write is one PUT (atomic there) and folders do not exist, so ``makedirs`` does nothing.
Object stores are configured only by their standard environment (for S3:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar, Union
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

Location = Union[str, "os.PathLike[str]"]

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_LOOKS_LIKE_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/?(?!/)")  # 's3:/b' or 's3:b': slashes missing
_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
        "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")
CONNECT_TIMEOUT_S = 5.0  # per connection attempt to an object store
CHECK_TIMEOUT_S = 30.0  # check_location gives up on a store that does not answer in this time
IO_THREADS = 16  # concurrent requests when many small objects are read (commit checks, aggregation)
T = TypeVar("T")
R = TypeVar("R")


def is_uri(location: Location) -> bool:
    """True for 'scheme://...' locations other than file:// (which is a local path)."""
    text = os.fspath(location)
    return bool(_URI.match(text)) and not text.lower().startswith("file://")


def location(text: Location) -> Path | str:
    """The canonical form of a location: an absolute ``Path`` for local paths (and file://
    URIs), the URI without a trailing slash otherwise."""
    text = os.fspath(text)
    if text.lower().startswith("file://"):
        return Path(urlsplit(text).path).expanduser().resolve()
    if not is_uri(text):
        return Path(text).expanduser().resolve()
    parts = urlsplit(text)
    path = re.sub(r"/+", "/", parts.path).rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


KNOWN_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # what pyarrow.fs.FileSystem.from_uri opens


def uri_problem(text: str) -> str | None:
    """Why ``text`` cannot name a location, said without contacting any store (or None): a
    local path that starts like a URI with its slashes missing ('s3:/bucket'), a URI
    without a bucket or host, a scheme pyarrow.fs does not open."""
    text = str(text)
    if not is_uri(text):
        m = _LOOKS_LIKE_URI.match(text)
        if m and m.group(1).lower() in KNOWN_SCHEMES:
            return f"{text!r} looks like a URI with a slash missing: write {m.group(1)}://{text[m.end():]}"
        return None
    parts = urlsplit(text)
    if parts.scheme.lower() not in KNOWN_SCHEMES:
        return (f"{text!r}: unknown storage scheme {parts.scheme + '://'!r}; use a local path or "
                f"{', '.join(s + '://' for s in KNOWN_SCHEMES)}")
    if not parts.netloc and parts.scheme.lower() not in ("hdfs", "viewfs"):
        return f"{text!r} names no bucket: write {parts.scheme}://BUCKET/PREFIX"
    return None


def environment(loc: Location) -> dict[str, str]:
    """The store's standard environment variables that are set here, for a URI location (so
    a driver can hand them to the workers it starts); {} for local paths."""
    return {k: os.environ[k] for k in _ENV if k in os.environ} if is_uri(loc) else {}


def join(base: Location, *parts: str) -> Path | str:
    """``base`` / parts: a Path for local locations, a URI (query kept) otherwise."""
    if not is_uri(base):
        return Path(base).joinpath(*parts)
    split = urlsplit(os.fspath(base))
    path = "/".join([split.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((split.scheme, split.netloc, path, split.query, ""))


def name(loc: Location) -> str:
    """The last component of a location (the campaign name of a campaign directory)."""
    if not is_uri(loc):
        return Path(loc).name
    split = urlsplit(os.fspath(loc))
    return split.path.rstrip("/").rsplit("/", 1)[-1] or split.netloc


def parent(loc: Location) -> Path | str:
    """The location holding ``loc``."""
    if not is_uri(loc):
        return Path(loc).parent
    split = urlsplit(os.fspath(loc))
    return urlunsplit((split.scheme, split.netloc, split.path.rstrip("/").rsplit("/", 1)[0], split.query, ""))


def _root_key(uri: str) -> tuple:
    """What decides a URI's filesystem: scheme, bucket/host, query options and the store's
    environment (so a changed environment gets a new connection)."""
    split = urlsplit(uri)
    return (split.scheme.lower(), split.netloc, split.query, tuple(os.environ.get(k) for k in _ENV))


_CACHE: dict[tuple, tuple[pafs.FileSystem, str]] = {}
_LOCK = threading.Lock()


def _filesystem(key: tuple) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path of the URI's root in it), created once per process and key."""
    with _LOCK:
        if key not in _CACHE:
            scheme, netloc, query = key[:3]
            root = urlunsplit((scheme, netloc, "/", query, ""))
            fs, path = pafs.FileSystem.from_uri(root)
            if isinstance(fs, pafs.S3FileSystem):
                options = fs.__reduce__()[1][0]  # from_uri's resolution (endpoint, region), credentials from the environment
                # delayed open: a small file is one PutObject at close, not a multipart upload
                options.update(allow_delayed_open=True, connect_timeout=CONNECT_TIMEOUT_S)
                fs = pafs.S3FileSystem(**options)
            _CACHE[key] = (fs, path.rstrip("/") if path not in ("", "/") else path)
        return _CACHE[key]


def resolve(loc: Location) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a location; local paths get the local filesystem."""
    if not is_uri(loc):
        return pafs.LocalFileSystem(), str(Path(loc).expanduser().resolve())
    text = os.fspath(loc)
    fs, root = _filesystem(_root_key(text))
    rest = re.sub(r"/+", "/", urlsplit(text).path).strip("/")
    if not rest:
        return fs, root
    return fs, (f"{root}/{rest}" if root not in ("", "/") else f"{root}{rest}")


# ---------------------------------------------------------------- operations


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` whole: through a temporary file and a rename on a local disk (readers
    never see half a file), one PUT on an object store (atomic there)."""
    if not is_uri(loc):
        path = Path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = resolve(loc)
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_bytes(loc: Location) -> bytes:
    if not is_uri(loc):
        return Path(loc).read_bytes()
    fs, path = resolve(loc)
    with fs.open_input_stream(path) as f:
        return f.readall()


def _info(loc: Location) -> pafs.FileInfo:
    fs, path = resolve(loc)
    return fs.get_file_info(path)


def exists(loc: Location) -> bool:
    return Path(loc).exists() if not is_uri(loc) else _info(loc).type != pafs.FileType.NotFound


def is_file(loc: Location) -> bool:
    return Path(loc).is_file() if not is_uri(loc) else _info(loc).type == pafs.FileType.File


def is_dir(loc: Location) -> bool:
    """A local directory; on an object store, a prefix that holds objects."""
    return Path(loc).is_dir() if not is_uri(loc) else _info(loc).type == pafs.FileType.Directory


def file_size(loc: Location) -> int | None:
    """The size of a file, None when there is no file."""
    if not is_uri(loc):
        path = Path(loc)
        return path.stat().st_size if path.is_file() else None
    info = _info(loc)
    return info.size if info.type == pafs.FileType.File else None


def list_names(folder: Location, suffix: str = "") -> list[str]:
    """Sorted names of the files directly in ``folder`` ending with ``suffix`` ([] when
    there is no such folder)."""
    if not is_uri(folder):
        path = Path(folder)
        return sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(suffix)) if path.is_dir() else []
    fs, path = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def list_entries(folder: Location) -> list[str]:
    """Sorted names of everything directly in ``folder`` (files and folders; [] if none)."""
    if not is_uri(folder):
        path = Path(folder)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    fs, path = resolve(folder)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def delete(loc: Location) -> None:
    """Remove a file; a missing one is fine."""
    if not is_uri(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = resolve(loc)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def delete_tree(loc: Location) -> None:
    """Remove a folder and everything under it (an object-store prefix: every object under
    it); a missing one is fine."""
    if not is_uri(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    fs, path = resolve(loc)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


def makedirs(loc: Location) -> None:
    """Create a local folder and its parents; object stores have no folders: nothing to do."""
    if not is_uri(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)


def sha256(loc: Location) -> str:
    """The SHA-256 of a file's content, in hex."""
    digest = hashlib.sha256()
    if not is_uri(loc):
        with open(loc, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        digest.update(read_bytes(loc))
    return digest.hexdigest()


def read_table(loc: Location, **kwargs) -> pa.Table:
    """``pyarrow.parquet.read_table`` of one file, wherever it lives."""
    if not is_uri(loc):
        return pq.read_table(loc, **kwargs)
    return pq.read_table(pa.BufferReader(read_bytes(loc)), **kwargs)  # one GET, not a request per column chunk


def read_schema(loc: Location) -> pa.Schema:
    if not is_uri(loc):
        return pq.read_schema(loc)
    fs, path = resolve(loc)
    with fs.open_input_file(path) as f:
        return pq.read_schema(f)


def map_io(function: Callable[[T], R], items: Iterable[T], loc: Location) -> list[R]:
    """``[function(item) for item in items]``; for a location on an object store the calls
    run in threads (each one waits on the network), in the same order."""
    items = list(items)
    if not is_uri(loc) or len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(IO_THREADS, len(items)), thread_name_prefix="bitflip-io") as pool:
        return list(pool.map(function, items))


# ---------------------------------------------------------------- checks


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_s3(loc: str) -> bool:
    return urlsplit(loc).scheme.lower() == "s3"


def _endpoint(loc: str) -> str:
    """' at <endpoint>' for S3 locations with an endpoint set in the environment, else ''."""
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")) if _is_s3(loc) else None
    return f" at {endpoint}" if endpoint else ""


def _store_problem(loc: str, exc: BaseException, missing_bucket: str = "create it, or choose another --out") -> str:
    """One line saying why a store refused ``loc``: missing bucket, credentials, network."""
    text = str(exc)
    m = re.search(r"AWS Error (\w+) during (\w+) operation: ?(.*)", text)
    code, detail = (m.group(1), m.group(3).split(" (Request ID")[0].strip()) if m else ("", _first_line(exc))
    at = _endpoint(loc)
    bucket = urlsplit(loc).netloc
    if code == "NO_SUCH_BUCKET" or "bucket does not exist" in text.lower():
        return f"{loc}: bucket {bucket!r} does not exist{at}; {missing_bucket}"
    if code in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED", "EXPIRED_TOKEN",
                "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT", "MISSING_AUTHENTICATION_TOKEN") or "403" in code:
        why = detail if detail and detail != "No response body." else code.replace("_", " ").lower()
        return (f"{loc}: the store{at} refused the credentials ({why}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)")
    if code == "NETWORK_CONNECTION" or "curlCode" in text or "Could not connect" in text:
        why = detail.split("Details: ")[-1] if "Details: " in detail else detail
        return (f"{loc}: cannot reach the object store{at} ({why}); check the network"
                + (" and AWS_ENDPOINT_URL" if _is_s3(loc) else ""))
    return f"cannot write to {loc} ({_first_line(exc)})"


def check_location(loc: Location, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """For a URI: write, read back and delete a probe object under it, within ``timeout_s``;
    raise ValueError with one line (missing bucket, credentials refused, store unreachable,
    unknown scheme) otherwise. Local paths are left to the caller (nothing is checked)."""
    _check_store(loc, _probe_object, timeout_s)


def _probe_object(text: str) -> None:
    """Write, read back and delete a probe object under the URI ``text``."""
    folder = join(text, f".bitflip-probe-{uuid.uuid4().hex}")
    write_bytes(join(folder, "probe"), b"probe")
    try:  # read back: a store may take a PUT with credentials it refuses for reads (HEAD)
        read_bytes(join(folder, "probe"))
    finally:  # a listing and DeleteObjects: removable even where the HEAD was refused
        delete_tree(folder)


def _within(timeout_s: float, work, name: str) -> list[BaseException | None]:
    """Run ``work()`` in a daemon thread for at most ``timeout_s``: [] when it did not answer,
    [None] when it returned, [the exception] when it raised."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            result.append(None)
        except BaseException as exc:  # reported by the caller's thread
            result.append(exc)

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result


def check_readable(loc: Location, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """For a URI: that its bucket exists and the store answers a listing, within ``timeout_s``
    (read only: for ``resume`` and ``report``); one ValueError line otherwise."""
    def probe(text: str) -> None:
        fs, path = resolve(text)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"AWS Error NO_SUCH_BUCKET during HeadBucket operation: {bucket}")
        fs.get_file_info(path)

    _check_store(loc, probe, timeout_s, missing_bucket="check the location and AWS_ENDPOINT_URL")


def _check_store(loc: Location, probe, timeout_s: float, missing_bucket: str | None = None) -> None:
    """Run ``probe(uri)`` in a thread bounded by ``timeout_s``: one ValueError line for a bad
    URI, a missing bucket, refused credentials or an unreachable store."""
    text = os.fspath(loc)
    problem = uri_problem(text)
    if problem:
        raise ValueError(problem)
    if not is_uri(text):
        return

    def work() -> None:
        try:
            resolve(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
            raise ValueError(f"cannot use {text}: {_first_line(exc)}") from None
        probe(text)

    result = _within(timeout_s, work, "bitflip-storage-check")
    if not result:
        raise ValueError(f"{text}: no answer from the object store{_endpoint(text)} within {timeout_s:g} s; "
                         "check the network" + (" and AWS_ENDPOINT_URL" if _is_s3(text) else ""))
    if isinstance(result[0], ValueError):
        raise result[0]
    if result[0] is not None:
        raise ValueError(_store_problem(text, result[0], *([missing_bucket] if missing_bucket else [])))


# ---------------------------------------------------------------- outages


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
MIN_FREE_BYTES = 1 << 20  # a local campaign disk with less free space than this counts as full
PROBE_TIMEOUT_S = 10.0  # one probe of a campaign location during a campaign


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(loc: Location) -> int:
    """Bytes an unprivileged process may still write on the disk holding local ``loc``."""
    return shutil.disk_usage(_existing(Path(loc))).free


def disk_full_line(loc: Location) -> str:
    return f"the disk under {loc} is full ({free_bytes(loc):,} bytes free)"


def outage(loc: Location, problem: BaseException | str) -> str | None:
    """One line, in our words, when ``problem`` (an exception, or an error's text such as a
    failed trial's) says that the campaign location ``loc`` is out of service: its disk
    full or read-only, its object store unreachable, its bucket gone, its credentials
    refused. None for any other error (a trial's own)."""
    text = problem if isinstance(problem, str) else f"{type(problem).__name__}: {problem}"
    number = None if isinstance(problem, str) else getattr(problem, "errno", None)
    if not is_uri(loc):
        if number in DISK_FULL_ERRNOS or "No space left on device" in text or "Disk quota exceeded" in text:
            return disk_full_line(loc)
        if number == errno.EROFS or "Read-only file system" in text:
            return f"the disk under {loc} became read-only"
        return None
    loc = os.fspath(loc)
    at = _endpoint(loc) or f" of {urlsplit(loc).scheme}://{urlsplit(loc).netloc}"
    m = re.search(r"AWS Error (\w+) during (\w+) operation: ?([^\n]*)", text)
    code, detail = (m.group(1), m.group(3).split(" (Request ID")[0].strip()) if m else ("", "")
    if code == "NO_SUCH_BUCKET" or "bucket does not exist" in text.lower():
        return f"the bucket {urlsplit(loc).netloc!r}{_endpoint(loc)} is gone"
    if code in _REFUSED or "403" in code:
        return f"the object store{at} refused the credentials ({detail or code.replace('_', ' ').lower()})"
    if code == "NETWORK_CONNECTION" or "curlCode" in text or "Could not connect" in text:
        why = (detail.split("Details: ")[-1] if "Details: " in detail else detail) or "no connection"
        return f"the object store{at} stopped answering ({why.strip()})"
    return None


_REFUSED = ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED", "EXPIRED_TOKEN",
            "INVALID_CLIENT_TOKEN_ID", "UNRECOGNIZED_CLIENT", "MISSING_AUTHENTICATION_TOKEN")


def probe_outage(loc: Location, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Whether the campaign location ``loc`` is out of service now, in one line (None: it
    works): a local disk with less than MIN_FREE_BYTES free or refusing a small probe file;
    a store that does not take, return and delete a probe object within ``timeout_s``."""
    if not is_uri(loc):
        folder = _existing(Path(loc))
        if free_bytes(folder) < MIN_FREE_BYTES:
            return disk_full_line(loc)
        probe = folder / f".bitflip-probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"\0" * 4096)
        except OSError as exc:
            return outage(loc, exc) or f"cannot write under {loc} ({exc.strerror or exc})"
        finally:
            probe.unlink(missing_ok=True)
        return None
    result = _within(timeout_s, lambda: _probe_object(os.fspath(loc)), "bitflip-storage-probe")
    if not result:
        return f"the object store{_endpoint(os.fspath(loc))} stopped answering (no answer within {timeout_s:g} s)"
    if result[0] is None:
        return None
    return outage(loc, result[0]) or f"the object store refused a probe of {loc} ({_first_line(result[0])})"
