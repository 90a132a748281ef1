"""What a batch job reads: a SOURCE -> an ordered list of rows, each with a path and a reader of its bytes.

A SOURCE is any of (see the module of each kind for its exact rules):

- plain image files (:mod:`.files`): a directory (walked recursively), a glob, a text file of paths, or one
  image;
- WebDataset tar shards (:mod:`.webdataset`): ``x.tar``, a brace list ``shards-{000000..000127}.tar``, a
  glob or a directory of ``.tar`` files, or a text file listing shards; one row per sample, path
  ``SHARD#KEY.EXT``;
- Parquet files with an image column (:mod:`.parquet`): one file, a brace list, a glob, a directory of
  ``.parquet`` files or a text file listing them; one row per table row, path ``FILE#ROW`` (or the
  ``id_column`` value);
- any of these behind an fsspec URL (:mod:`.urls`): ``s3://``, ``gs://``, ``http(s)://``, ``file://``.

A directory holding images is a folder of images; one holding none is read as Parquet files, else as
WebDataset shards. A list, glob or brace list whose entries all end in ``.tar`` (``.parquet``) is a shard
(Parquet) list; anything else lists images.

Every input gets a stable *row*: its position in the listing of the whole source (shard / file order, then
member / row order), so a resumed job and :func:`~mae_deploy.extract.open_features` see the same rows.
Planning reads what it must to count rows (tar headers, Parquet footers) and fails fast: a missing source
is exit 3, an unreachable URL or bucket exit 7 naming it.

Scale-out (:func:`split_rows`) uses **contiguous ranges**: with N inputs and S parts, part i gets rows
``[i*N//S, (i+1)*N//S)``. Part sizes differ by at most one, a part's local row j is global row
``start + j``, and the parts in index order, concatenated, are the whole source in order.
"""

from __future__ import annotations

import os
from pathlib import Path

from mae_deploy.errors import InputError
from mae_deploy.names import IMAGE_EXTENSIONS
from mae_deploy.sources import urls
from mae_deploy.sources.base import Failure, NamedBytes, RowReader, Source
from mae_deploy.sources.files import expand_glob, is_image_name, read_list, walk_directory, walk_url

__all__ = [
    "IMAGE_EXTENSIONS",
    "Failure",
    "NamedBytes",
    "RowReader",
    "Source",
    "is_image_name",
    "list_source",
    "split_rows",
]
_GLOB_CHARS = frozenset("*?[")
_SHARD_SUFFIX, _PARQUET_SUFFIX = ".tar", ".parquet"


def _suffix_kind(entries: list[str]) -> str | None:
    """'webdataset' / 'parquet' when every entry is a shard / a Parquet file, else None (images)."""
    low = [e.lower() for e in entries]
    if low and all(e.endswith(_SHARD_SUFFIX) for e in low):
        return "webdataset"
    if low and all(e.endswith(_PARQUET_SUFFIX) for e in low):
        return "parquet"
    return None


def _has_braces(s: str) -> bool:
    return "{" in s and "}" in s


def _expand_braces(s: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError as e:
        from mae_deploy.errors import MissingDependency

        raise MissingDependency("braceexpand", f"the brace list {s}", urls.INSTALL) from e
    return [
        urls.local_path(e)
        if urls.is_url(e) or e.lower().startswith("file://")
        else os.path.abspath(os.path.expanduser(e))
        for e in braceexpand(s)
    ]


def _walk_containers(root: str, is_url: bool) -> tuple[str, list[str]] | None:
    """A directory without images: its Parquet files, else its shards; None when it has neither."""
    for kind, suffix in (("parquet", _PARQUET_SUFFIX), ("webdataset", _SHARD_SUFFIX)):
        keep = lambda name, sfx=suffix: name.lower().endswith(sfx)  # noqa: E731
        found = walk_url(root, keep) if is_url else walk_directory(Path(root), keep)
        if found:
            return kind, found
    return None


def _listing(s: str) -> tuple[str, list[str]]:
    """(kind, entries) of a spec: entries are image paths, shard paths or Parquet paths, in row order."""
    if _has_braces(s) and (urls.is_url(s) or not os.path.exists(s)):
        entries = _expand_braces(s)
        return _suffix_kind(entries) or "list", entries
    if urls.is_url(s):
        return _url_listing(s)
    p = Path(s).expanduser()
    if p.is_dir():
        entries = walk_directory(p)
        if entries:
            return "directory", entries
        found = _walk_containers(str(p), is_url=False)
        if found:
            return found
        raise InputError(
            f"directory {s} holds no images (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            "any case), no .parquet files and no .tar shards; give another directory, a glob or a text file of "
            "paths"
        )
    if p.is_file():
        if is_image_name(p.name):
            return "file", [os.path.abspath(p)]
        if kind := _suffix_kind([p.name]):
            return kind, [os.path.abspath(p)]
        entries = read_list(str(p))
        if not entries:
            raise InputError(f"the list of paths {s} is empty (no non-blank, non-comment lines)")
        return _suffix_kind(entries) or "list", entries
    if p.exists():  # neither a directory nor a regular file: reading it would block or never end
        raise InputError(
            f"source {s} is not a regular file (a FIFO, socket or device); give a directory, a glob "
            "or a text file of image paths"
        )
    if _GLOB_CHARS & set(s):
        entries = expand_glob(s)
        if not entries:
            raise InputError(f"the glob {s!r} matches no files; check the pattern (quote it so the shell keeps it)")
        return _suffix_kind(entries) or "glob", entries
    raise InputError(f"source {s} does not exist; give a directory, a glob or a text file of image paths")


def _url_listing(s: str) -> tuple[str, list[str]]:
    fs = urls.filesystem(s)
    if _GLOB_CHARS & set(s.split("://", 1)[1]):
        entries = expand_glob(s)
        if not entries:
            raise InputError(f"the glob {s!r} matches no objects; check the pattern")
        return _suffix_kind(entries) or "glob", entries
    name = s.rstrip("/").rsplit("/", 1)[-1]
    if not s.endswith("/") and (is_image_name(name) or _suffix_kind([name])):
        urls.call(s, "opening", fs.info, s)  # exists and answers: exit 3 / 7 now, not per row later
        return _suffix_kind([name]) or "file", [s]
    if urls.call(s, "opening", fs.isdir, s):
        entries = walk_url(s)
        if entries:
            return "directory", entries
        found = _walk_containers(s, is_url=True)
        if found:
            return found
        raise InputError(f"{s} holds no images, no .parquet files and no .tar shards")
    urls.call(s, "opening", fs.info, s)
    entries = read_list(s)
    if not entries:
        raise InputError(f"the list of paths {s} is empty (no non-blank, non-comment lines)")
    return _suffix_kind(entries) or "list", entries


def list_source(spec: str | os.PathLike, *, image_column: str | None = None, id_column: str | None = None) -> Source:
    """The ordered listing of ``spec`` (any SOURCE above) with its reader.

    ``image_column`` / ``id_column`` choose the Parquet columns of the image bytes and of the row's path
    (defaults: the first Hugging Face image struct or binary column; ``FILE#ROW``); they are refused for other
    kinds. An empty result is an :class:`InputError` that says what was searched for.
    """
    s = urls.local_path(os.fspath(spec))
    kind, entries = _listing(s)
    if kind != "parquet" and (image_column is not None or id_column is not None):
        raise InputError(
            f"--image-column and --id-column apply to Parquet sources; {s} is "
            f"{'WebDataset shards' if kind == 'webdataset' else 'image files'}"
        )
    if kind == "webdataset":
        from mae_deploy.sources.webdataset import plan_shards

        return plan_shards(s, entries)
    if kind == "parquet":
        from mae_deploy.sources.parquet import plan_parquet

        return plan_parquet(s, entries, image_column=image_column, id_column=id_column)
    return Source(spec=s, kind=kind, paths=tuple(entries))


def split_rows(num_rows: int, num_parts: int = 1, part_index: int = 0) -> range:
    """Global rows of part ``part_index`` of ``num_parts``: a contiguous, balanced range."""
    if num_parts < 1:
        raise InputError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_index < num_parts:
        raise InputError(f"--part-index must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_index}")
    return range(part_index * num_rows // num_parts, (part_index + 1) * num_rows // num_parts)
