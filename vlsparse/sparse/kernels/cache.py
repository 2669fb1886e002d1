"""The cache of compiled libraries (our CPU kernel, the onnxruntime op library): trusted only when verified.

Rules, for every library vlsparse compiles and loads:

* the cache directory (``$VLSPARSE_CACHE``, default ``~/.cache/vlsparse``) is created with mode 0700;
* a library is loaded only from a directory owned by this user and writable by nobody else (no group or
  other write bit): else :class:`KernelCacheError`, one line naming the directory;
* the cache key covers the sources, the compiler (path and ``--version``), the flags and the vlsparse
  version (and the CPU, for ``-march=native`` code), so any change builds a new library;
* every library's sha256 is written beside it (``<library>.sha256``) when it is built, and checked before
  it is loaded: a library without a record, or whose bytes differ, is rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

__all__ = ["KernelCacheError", "cache_dir", "secure_dir", "record_digest", "verified", "digest_file"]


class KernelCacheError(ValueError):
    """A library cache directory that other users can write to (or that another user owns)."""


def cache_dir() -> Path:
    """``$VLSPARSE_CACHE`` or ``~/.cache/vlsparse`` (not created here)."""
    env = os.environ.get("VLSPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlsparse"


def secure_dir(path: Path) -> Path:
    """``path`` created (mode 0700, parents too) if missing, and checked to be a directory owned by this user
    that no one else can write to; returns it.

    Raises:
        KernelCacheError: group- or other-writable, owned by another user, or not a directory (naming it).
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise KernelCacheError(f"{path}: not a directory; vlsparse keeps its compiled libraries there")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
        raise KernelCacheError(f"{path}: writable by other users (mode {stat.S_IMODE(st.st_mode):04o}, owner uid "
                               f"{st.st_uid}); vlsparse loads no compiled library from it: chmod 700 it or set "
                               "VLSPARSE_CACHE to a private directory")
    return path


def digest_file(lib: Path) -> Path:
    """Where the sha256 of ``lib`` is recorded: ``<lib>.sha256``."""
    return lib.with_name(lib.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def record_digest(lib: Path) -> str:
    """Write the sha256 of the freshly built ``lib`` beside it (atomically); returns the hex digest."""
    digest = _sha256(lib)
    tmp = digest_file(lib).with_name(f".{lib.name}.sha256.{os.getpid()}.tmp")
    tmp.write_text(digest + "\n")
    os.replace(tmp, digest_file(lib))
    return digest


def verified(lib: Path) -> bool:
    """Whether ``lib`` exists with a recorded sha256 equal to its bytes' (else it must be rebuilt, not loaded)."""
    try:
        recorded = digest_file(lib).read_text().strip()
        return lib.is_file() and not lib.is_symlink() and recorded == _sha256(lib)
    except OSError:
        return False
