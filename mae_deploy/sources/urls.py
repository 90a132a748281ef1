"""fsspec URLs (``s3://``, ``gs://``, ``http(s)://``, ``file://``): which strings are URLs, their filesystems,
and what an unreachable one means.

fsspec and the protocol's package (s3fs, gcsfs; aiohttp for HTTP) are imported lazily, here only.
Credentials come the libraries' usual way (environment variables, profiles, instance metadata); an S3
endpoint other than AWS's is set with ``AWS_ENDPOINT_URL_S3`` (botocore) or ``FSSPEC_S3_ENDPOINT_URL``.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from mae_deploy.errors import InputError, MissingDependency, SourceUnreachable

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The package that provides each protocol, for the install line of a missing one.
_PROTOCOL_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "az": "adlfs",
    "abfs": "adlfs",
}
INSTALL = "pip install 'mae-deploy[sources]'"


def is_url(s: str) -> bool:
    """True for ``scheme://...`` other than ``file://`` (which is a local path, see :func:`local_path`)."""
    return bool(_URL.match(s)) and not s.lower().startswith("file://")


def local_path(s: str) -> str:
    """``file:///x/y`` -> ``/x/y``; anything else unchanged."""
    if s.lower().startswith("file://"):
        return unquote(urlsplit(s).path) or "/"
    return s


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


@functools.lru_cache(maxsize=16)
def _filesystem(proto: str):
    try:
        import fsspec
    except ImportError as e:
        raise MissingDependency("fsspec", f"reading {proto}:// sources", INSTALL) from e
    try:
        return fsspec.filesystem(proto)
    except ImportError as e:
        package = _PROTOCOL_PACKAGES.get(proto, f"the fsspec implementation of {proto}://")
        raise MissingDependency(package, f"reading {proto}:// sources", INSTALL) from e
    except ValueError as e:  # fsspec: "Protocol not known"
        raise InputError(
            f"{proto}:// is not a protocol fsspec knows ({e}); use s3://, gs://, http(s):// or file://"
        ) from e


def filesystem(url: str):
    """The (cached, per process) fsspec filesystem of ``url``'s protocol."""
    return _filesystem(protocol(url))


def join(base_url: str, rel: str) -> str:
    """``rel`` (a URL, an absolute path or a relative one) against the directory of ``base_url``."""
    if is_url(rel) or rel.lower().startswith("file://"):
        return rel
    head = base_url.rsplit("/", 1)[0]
    if rel.startswith("/"):  # absolute within the same bucket / host
        scheme, rest = base_url.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}{rel}"
    return f"{head}/{rel}"


def unreachable(url: str, exc: BaseException) -> SourceUnreachable:
    """Exit 7 naming the URL (or its bucket) and the library's reason."""
    return SourceUnreachable(
        f"cannot reach {url}: {type(exc).__name__}: {exc}; check the URL, the network and the credentials "
        "(environment variables or profiles of the storage library)"
    )


def missing_or_unreachable(url: str, exc: FileNotFoundError) -> Exception:
    """A FileNotFoundError at planning: exit 3 when the bucket / host answers (the object is missing),
    exit 7 naming the bucket when the bucket itself is not there."""
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None:  # fsspec's HTTP reports a refused connection as FileNotFoundError from it
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            return unreachable(url, cause)
        cause = cause.__cause__ or cause.__context__
    fs = filesystem(url)
    scheme, rest = url.split("://", 1)
    root = rest.split("/", 1)[0]
    if scheme.lower() not in ("http", "https"):
        try:
            root_there = fs.exists(f"{scheme}://{root}")
        except Exception as e:  # noqa: BLE001 - whatever the library raises, the bucket is not reachable
            return unreachable(f"{scheme}://{root}", e)
        if not root_there:
            return SourceUnreachable(
                f"bucket {scheme}://{root} (of {url}) does not exist or is not visible with "
                "these credentials; check its name and the credentials"
            )
    return InputError(f"source {url} does not exist; check the path")


def call(url: str, what: str, fn: Any, *args, **kwargs):
    """``fn(*args)`` at planning, with the library's errors turned into exit 3 (missing) or 7 (unreachable)."""
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError as e:
        raise missing_or_unreachable(url, e) from e
    except PermissionError as e:
        raise SourceUnreachable(f"permission denied {what} {url}: {e}; check the credentials") from e
    except (InputError, MissingDependency):
        raise
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts: the libraries raise many kinds
        raise unreachable(url, e) from e


def size_of(path: str) -> int:
    """Size in bytes of a local path or URL (planning: errors become exit 3 / 7)."""
    if is_url(path):
        return int(call(path, "sizing", filesystem(path).size, path))
    return os.path.getsize(path)


def open_planned(path: str, what: str, block_size: int = 4 << 20):
    """A seekable binary file of a local path or URL (URLs with a read-ahead buffer of ``block_size``).

    ``what`` names the file in errors: a missing file is exit 3, an unreachable URL or bucket exit 7.
    """
    try:
        if is_url(path):
            fs = filesystem(path)
            return call(path, "opening", fs.open, path, "rb", block_size=block_size, cache_type="readahead")
        return open(path, "rb")
    except FileNotFoundError as e:
        raise InputError(f"{what} {path} does not exist; check the path") from e
    except OSError as e:
        raise InputError(f"cannot open {what} {path}: {e}") from e
