"""Byte-offset indexes of bottom-up-attention TSV files, cached on disk.

The index of a TSV file maps the image id of each line (its first tab-separated field) to the byte
offset of the line, so that one image is read by seeking to it
(:class:`vlsparse.data.visual.features.TSVFeatures`). It takes one pass over the file and is kept as
JSON in ``<cache_dir>/feature-index/<sha256 of absolute path, size, mtime>.json`` (written atomically;
an unwritable cache directory only means rescanning next time). A file that changes size or mtime
gets a new index.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vlsparse.atomic import write_json

__all__ = ["tsv_index", "index_path", "scan_tsv", "INDEX_VERSION"]

#: the version of the cached index format (part of the cache key)
INDEX_VERSION = 1


def index_path(path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Where the cached index of the TSV file ``path`` lives under ``cache_dir`` (changes with its size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"v{INDEX_VERSION}\0{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    return Path(cache_dir) / "feature-index" / f"{key}.json"


def scan_tsv(path: Path) -> dict[str, int]:
    """img_id -> byte offset of its line, in file order (a repeated id: its last line).

    Raises:
        ValueError: a non-empty line without a tab after a non-empty id, or an id that is not UTF-8 (naming
            the file and line number).
    """
    index: dict[str, int] = {}
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            tab = line.find(b"\t")
            if tab > 0:
                try:
                    img_id = line[:tab].decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}: line {line_no}: image id is not UTF-8") from None
                index[img_id] = offset
            elif line.strip():
                raise ValueError(f"{path}: line {line_no}: expected tab-separated fields starting with an image id")
            offset += len(line)
    return index


def tsv_index(path: Path, cache_dir: str | os.PathLike) -> dict[str, int]:
    """:func:`scan_tsv` of ``path`` (an absolute path), read from the cache under ``cache_dir`` when it is
    there and written to it when it is not; an unreadable or damaged cache entry (ids not strings, offsets not
    integers >= 0) is rebuilt."""
    cache = index_path(path, cache_dir)
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data["version"] == INDEX_VERSION and data["path"] == str(path):
            index = dict(zip(data["ids"], data["offsets"], strict=True))
            if all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in index.items()):
                return index  # else a damaged entry: rescan
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass  # no cache, or unreadable: rescan
    index = scan_tsv(path)
    try:
        write_json(cache, {"version": INDEX_VERSION, "path": str(path),
                           "ids": list(index), "offsets": list(index.values())})
    except OSError:
        pass
    return index
