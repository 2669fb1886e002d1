"""Build and cache the onnxruntime custom-op library (``vlsparse.SparseLinear``).

``custom_op_library()`` compiles ``csrc/ort_sparse_linear.cc`` (which includes ``csrc/spmm.h``) with the
system C++ compiler into a shared library that onnxruntime loads through
``SessionOptions.register_custom_ops_library``. Nothing here imports torch or includes torch headers:
the sparse ONNX runtime path works in an environment with only numpy, onnx and onnxruntime.

The library is cached in ``$VLSPARSE_CACHE`` (default ``~/.cache/vlsparse``, created 0700) under a name
keyed by a hash of the sources, the flags, the compiler's version, the vlsparse version and the CPU
(``-march=native`` code is only valid on the CPU it was built for). Its sha256 is recorded beside it when
it is built and checked before every load: a library that does not match is rebuilt, never loaded, and a
cache directory that other users can write to is refused (:mod:`vlsparse.sparse.kernels.cache`). It is compiled under a temporary name and moved into place with
``os.replace``, so concurrent builds never see a half-written file. The compiler is ``$CXX`` when set,
else ``g++``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import vlsparse._version
from vlsparse.sparse.kernels.cache import cache_dir, record_digest, secure_dir, verified

__all__ = [
    "CSRC",
    "FLAGS",
    "cache_dir",
    "custom_op_library",
    "set_num_threads",
    "set_openmp",
    "uses_ort_pool",
]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = "ort_sparse_linear.cc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fvisibility=hidden")
_LIB_STEM = "vlsparse_ort"

_lock = threading.Lock()
_built: dict[tuple[str, str], Path] = {}


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    """Resolved path + ``--version`` of the compiler (part of the cache key; once per process)."""
    exe = shutil.which(cxx)
    if exe is None:
        raise RuntimeError(
            f"vlsparse: the C++ compiler {cxx!r} was not found on PATH; it is needed to build the "
            "onnxruntime custom-op library (install g++, e.g. `apt-get install g++`, or set CXX)."
        )
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"vlsparse: could not run the C++ compiler {exe!r}: {e}") from e
    if out.returncode != 0:
        raise RuntimeError(f"vlsparse: the C++ compiler {exe!r} failed on --version: {out.stderr.strip()}")
    return f"{exe}\n{out.stdout.strip()}"


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() + platform.processor()
    keep = []
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "vendor_id") and line not in keep:
            keep.append(line)
        if len(keep) >= 3:
            break
    return platform.machine() + "\n" + "\n".join(keep)


def _sources() -> list[Path]:
    """The .cc that is compiled plus every header it may include (all of csrc/*.h)."""
    src = CSRC / SOURCE
    if not src.is_file():
        raise RuntimeError(f"vlsparse: custom-op source {src} is missing (broken installation?)")
    return [src, *sorted(CSRC.glob("*.h"))]


def _key(cxx_version: str) -> str:
    h = hashlib.sha256()
    for p in _sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update("\0".join(FLAGS).encode() + b"\0")
    h.update(cxx_version.encode() + b"\0")
    h.update(vlsparse._version.__version__.encode() + b"\0")
    h.update(_cpu_fingerprint().encode())
    return h.hexdigest()[:20]


def custom_op_library() -> Path:
    """Path of the compiled custom-op library, building it on first use.

    The library is loaded only when its bytes match the sha256 recorded at build time; otherwise (a file
    planted under the predictable name, or altered) it is rebuilt first.

    Raises:
        RuntimeError: naming the compiler when it is missing or the build fails.
        KernelCacheError (a ValueError): the cache directory is writable by other users (one line naming it).
    """
    cxx = _compiler()
    version = _compiler_version(cxx)
    key = _key(version)
    out_dir = cache_dir()
    memo = (key, str(out_dir))  # a changed $VLSPARSE_CACHE builds (or finds) the library there
    with _lock:
        secure_dir(out_dir)
        if memo in _built and verified(_built[memo]):
            return _built[memo]
        lib = out_dir / f"{_LIB_STEM}-{key}.so"
        if not verified(lib):  # missing, planted or altered: build (it replaces the file), record its sha256
            _compile(cxx, lib)
            record_digest(lib)
        _built[memo] = lib
        return lib


def _compile(cxx: str, lib: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{lib.stem}-", suffix=".so.tmp", dir=lib.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [cxx, *FLAGS, "-I", str(CSRC), "-o", str(tmp), str(CSRC / SOURCE)]
    try:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:  # not runnable, or timed out
            raise RuntimeError(f"vlsparse: could not run the C++ compiler {cxx!r}: {e}") from e
        if res.returncode != 0:
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-40:])
            raise RuntimeError(
                f"vlsparse: building the onnxruntime custom-op library with {cxx!r} failed "
                f"(exit {res.returncode}).\ncommand: {' '.join(cmd)}\n{tail}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, lib)
    finally:
        if tmp.exists():
            tmp.unlink()


def set_num_threads(n: int | None) -> None:
    """OpenMP threads of SparseLinear when it runs on OpenMP (``None``/0: OpenMP's default).

    On onnxruntime >= 1.17 the op runs on onnxruntime's intra-op thread pool (its size is the session's
    ``intra_op_num_threads``) and this setting is unused, unless :func:`set_openmp` asked for OpenMP.
    Process-wide (the library is loaded once per process; every session shares it). The
    ``VLSPARSE_NUM_THREADS`` environment variable is the fallback when this was never called.
    """
    lib = ctypes.CDLL(str(custom_op_library()))
    lib.vlsparse_ort_set_num_threads(ctypes.c_int(int(n or 0)))


def set_openmp(on: bool) -> None:
    """Run SparseLinear on its own OpenMP pool (True) instead of onnxruntime's intra-op pool (False, the
    default where onnxruntime >= 1.17 provides it). Process-wide, takes effect at the next call; meant
    for side-by-side comparisons: two pools on the same cores compete (see README, Performance)."""
    ctypes.CDLL(str(custom_op_library())).vlsparse_ort_set_openmp(ctypes.c_int(1 if on else 0))


def uses_ort_pool() -> bool:
    """Whether SparseLinear calls run on onnxruntime's intra-op pool (known once a session was created
    with the library registered; False before that, on onnxruntime < 1.17 and after ``set_openmp(True)``)."""
    return bool(ctypes.CDLL(str(custom_op_library())).vlsparse_ort_uses_ort_pool())
