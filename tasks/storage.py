"""Where a run reads and writes: local paths and fsspec URLs, alike.

Every path a run touches (its input, the work directory with its shards, state and
downloads, the output and its Parquet copy) may be a local path or an fsspec URL
(``s3://``, ``gs://``, ``az://``, ``file://``, ``memory://``). Cloud filesystems come
from the optional extras (``s3``, ``gcs``, ``azure``) and are configured the standard way
for each (for S3, the AWS environment: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

Object stores have no append and no atomic rename, so what must not be seen half-written
goes under a temporary name and is published (copied, then the temporary name removed)
only when complete, and records that must be made once use a create-once write.
"""

from __future__ import annotations

import os
import posixpath
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

_create_lock = threading.Lock()


class StorageRootError(PermissionError):
    """A path falls outside the storage roots this deployment allows; nothing was read."""


def is_url(path: str) -> bool:
    return "://" in path


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``path`` and the path within it."""
    fs, inner = url_to_fs(os.fspath(path))
    return fs, inner


def is_local(path: str) -> bool:
    return isinstance(filesystem(path)[0], LocalFileSystem)


def local_path(path: str) -> str | None:
    """The local filesystem path of ``path`` (a plain path or ``file://``), else None."""
    fs, inner = filesystem(path)
    return inner if isinstance(fs, LocalFileSystem) else None


def join(base: str, *parts: str) -> str:
    """``base`` with ``parts`` appended, keeping the URL's scheme."""
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def normalise(path: str) -> str:
    """A canonical form for comparisons: absolute local paths, URLs as given (no ``..``)."""
    if is_url(path):
        scheme, rest = path.split("://", 1)
        if scheme == "file":
            return os.path.realpath(rest)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(os.path.abspath(path))


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def size(path: str) -> int:
    fs, inner = filesystem(path)
    return int(fs.size(inner))


def makedirs(path: str) -> None:
    fs, inner = filesystem(path)
    fs.makedirs(inner, exist_ok=True)


def open_file(path: str, mode: str = "rb") -> IO[Any]:
    """Open for streaming; local paths use the builtin ``open`` (fastest)."""
    local = local_path(path)
    if local is not None:
        if "w" in mode:
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        return open(local, mode)  # noqa: SIM115 - the caller closes it
    fs, inner = filesystem(path)
    if "w" in mode:
        fs.makedirs(posixpath.dirname(inner), exist_ok=True)
    return fs.open(inner, mode)


def remove(path: str) -> None:
    fs, inner = filesystem(path)
    try:
        fs.rm_file(inner)
    except FileNotFoundError:
        pass


def remove_tree(path: str) -> None:
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def listdir(path: str) -> list[str]:
    """Full paths (in ``path``'s own form) of the entries directly under ``path``."""
    fs, inner = filesystem(path)
    try:
        names = fs.ls(inner, detail=False)
    except FileNotFoundError:
        return []
    return sorted(join(path, posixpath.basename(n.rstrip("/"))) for n in names)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


def read_many(paths: list[str]) -> dict[str, bytes]:
    """Several small objects at once (concurrently on object stores)."""
    if not paths:
        return {}
    fs, _ = filesystem(paths[0])
    inner = {filesystem(p)[1]: p for p in paths}
    found = fs.cat(list(inner), on_error="omit")
    return {inner[k]: v for k, v in found.items() if k in inner}


def write_bytes(path: str, data: bytes) -> None:
    """Write a small object whole: a temporary name first where the store can rename."""
    local = local_path(path)
    if local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        tmp = f"{local}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, local)
        return
    fs, inner = filesystem(path)
    fs.pipe_file(inner, data)  # one PUT: an object is whole or absent


def create_once(path: str, data: bytes) -> bool:
    """Write ``path`` only if nothing is there; False if it exists already.

    Locally ``O_EXCL``; on S3 a conditional put (``If-None-Match: *``); elsewhere a check
    and a write under a process lock (stores without conditional writes: one machine)."""
    local = local_path(path)
    if local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        try:
            fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True
    fs, inner = filesystem(path)
    try:
        fs.pipe_file(inner, data, mode="create")
        return True
    except FileExistsError:
        return False
    except TypeError:  # a filesystem whose pipe_file has no create mode
        pass
    with _create_lock:
        if fs.exists(inner):
            return False
        fs.pipe_file(inner, data)
        return True


@contextmanager
def published(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` under a temporary name and publish it only when the block ends
    without an error, so no reader ever sees it half-written; on error it is removed."""
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    handle = open_file(tmp, mode)
    try:
        yield handle
        handle.close()
    except BaseException:
        handle.close()
        remove(tmp)
        raise
    publish(tmp, path)


def publish(tmp: str, path: str) -> None:
    """Move a complete temporary object to its final name (atomic locally; a server-side
    copy then a delete on object stores, where the copy appears whole)."""
    local_tmp, local = local_path(tmp), local_path(path)
    if local_tmp is not None and local is not None:
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        os.replace(local_tmp, local)
        return
    fs, inner_tmp = filesystem(tmp)
    _, inner = filesystem(path)
    fs.mv(inner_tmp, inner)


def under_roots(path: str, roots: Iterable[str]) -> bool:
    """True if ``path`` is inside one of ``roots`` (after normalising both)."""
    target = normalise(path)
    for root in roots:
        base = normalise(root).rstrip("/")
        if target == base or target.startswith(base + "/"):
            return True
    return False


def check_roots(paths: dict[str, str | None], roots: list[str] | None) -> None:
    """Refuse, before anything is read, a run whose paths fall outside ``roots``."""
    if not roots:
        return
    for name, path in paths.items():
        if path and not under_roots(path, roots):
            raise StorageRootError(
                f"{name} {path!r} is outside the storage roots this deployment allows "
                f"({', '.join(roots)}); choose a path under one of them"
            )
