"""Our C++ CPU CSR SpMM kernel (csrc/spmm.h), compiled on first use.

The extension is built with ``torch.utils.cpp_extension.load`` into a cache directory
(``$VLSPARSE_CACHE`` or ``~/.cache/vlsparse``, created 0700) named by a hash of the sources, the flags,
the compiler (path and version), the torch/python/vlsparse versions and the CPU's feature flags, so an
edited source (or another machine sharing the cache) rebuilds instead of loading a stale library. The
library's sha256 is recorded beside it after the build and checked before it is loaded: a library that
does not match is removed with its build files and rebuilt, and a directory writable by other users is
refused (:mod:`vlsparse.sparse.kernels.cache`). It links torch's own OpenMP
runtime, so ``torch.set_num_threads`` sets the kernel's thread count too.

Public API (activation: "none" | "gelu", applied in the kernel's epilogue):
    spmm_cpu(x, crow_indices, col_indices, values, bias=None, out_features=..., activation=, kernel=)
        -> (T, out)
    spmm_cpu_fm(xt, crow_indices, col_indices, values, bias=None, out_features=..., activation=,
                out_layout="feature" | "row", pad=0, kernel=) -> (out, T) or (T, out)
    simd() -> "avx512" | "avx2" | "scalar"
    kernel_path(kernel, tokens) -> "insert" | "xreg" | "gather" | "small_rows" | "strips"
    tuning() -> dict; set_tuning(**values)

``kernel`` (every one gives the same result to rounding; csrc/spmm.h, ``enum class Path``):
    "auto"    the default: T <= tuning()["insert_tokens"] (1): "insert"; T <= tuning()["small_tokens"] (2):
              small_rows (x[c] by scalar loads into a buffer); more: the token strips (X transposed to
              feature-major, up to tuning()["max_vectors"] 16-token vectors in registers per pass over a
              row, cache-blocked)
    "legacy"  the kernel as at commit 403de79 (small_rows for T <= 2, no "insert"), for side-by-side timing
    "insert"  x[c] by scalar loads that vinsertps puts into xmm lanes, 4 FMA chains (csrc/spmm_gather.h)
    "xreg"    x in zmm registers 64 columns at a time, vpermt2ps lookups (csrc/spmm_xreg.h; AVX-512 BW)
    "gather"  vgatherdps gather-dot (csrc/spmm_gather.h); both at every T, both slower than small_rows at
              T = 1 on the Zen 4 this was measured on (README), selectable to measure other CPUs
    "strips"  the strips at every T (tests, benchmarks)
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

import vlsparse._version
from vlsparse.sparse.kernels.cache import cache_dir, record_digest, secure_dir, verified

__all__ = ["ACTIVATIONS", "KERNELS", "spmm_cpu", "spmm_cpu_fm", "load_extension", "simd", "kernel_path", "tuning",
           "set_tuning", "cache_dir", "CompilerNotFoundError"]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("spmm_torch.cpp",)
HEADERS = ("spmm.h", "spmm_gather.h", "spmm_xreg.h")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-Wno-maybe-uninitialized")

#: epilogue name -> the kernel's code (0 none, 1 GELU in its erf form, as torch.nn.functional.gelu)
ACTIVATIONS = {"none": 0, "gelu": 1}
#: kernel name -> the kernel's Path code (csrc/spmm.h)
KERNELS = {"auto": 0, "legacy": 1, "gather": 2, "strips": 3, "xreg": 4, "insert": 5}
_lock = threading.Lock()
_module: ModuleType | None = None


class CompilerNotFoundError(RuntimeError):
    """No C++ compiler to build the vlsparse CPU kernel."""


def _torch_lib() -> Path:
    return Path(torch.__file__).resolve().parent / "lib"


def _ldflags() -> list[str]:
    """Link the OpenMP runtime torch itself uses (torch/lib/libgomp.so.1 in the pip wheels)."""
    lib = _torch_lib()
    gomp = sorted(lib.glob("libgomp*.so*"))
    if gomp:
        return [f"-L{lib}", f"-l:{gomp[0].name}", f"-Wl,-rpath,{lib}"]
    return ["-fopenmp"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build_key(files: tuple[str, ...] = SOURCES + HEADERS) -> str:
    h = hashlib.sha256()
    for name in files:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    for part in (*CFLAGS, *_ldflags(), torch.__version__, sys.version, platform.machine(), _cpu_flags(),
                 _compiler_version(), vlsparse._version.__version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _find_compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise CompilerNotFoundError(
            f"vlsparse: no C++ compiler found ({cxx!r} is not on PATH); the CPU sparse kernel is "
            "compiled on first use. Install g++ (e.g. `apt-get install g++`) or set CXX, or use "
            "SparseLinear(backend='dense' or 'torch-sparse')."
        )
    return path


def _compiler_version() -> str:
    """The compiler's path and first ``--version`` line (part of the build key); "" when it cannot be run."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or ""
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60) if cxx else None
    except (OSError, subprocess.SubprocessError):
        out = None
    return f"{cxx}\n{(out.stdout.splitlines() or [''])[0] if out else ''}"


def _verified_build_dir(key: str, stem: str = "spmm") -> Path:
    """``<cache>/<stem>_<key>`` (0700, private), emptied when its library does not match its recorded sha256."""
    build_dir = secure_dir(secure_dir(cache_dir()) / f"{stem}_{key}")
    lib = build_dir / f"vlsparse_{stem}_{key}.so"
    if lib.exists() and not verified(lib):  # planted or altered: never loaded; rebuilt from scratch
        shutil.rmtree(build_dir)
        secure_dir(build_dir)
    return build_dir


def load_extension(verbose: bool = False) -> ModuleType:
    """Build (first call) or load the cached extension module; a cached library is loaded only when it matches
    the sha256 recorded when it was built.

    Raises:
        CompilerNotFoundError: no C++ compiler; RuntimeError: the build failed.
        KernelCacheError (a ValueError): the cache directory is writable by other users (naming it).
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        _module = build_module("spmm", SOURCES, HEADERS, verbose)
        return _module


def build_module(stem: str, sources: tuple[str, ...], headers: tuple[str, ...], verbose: bool = False) -> ModuleType:
    """Build (or load from the verified cache) the extension ``vlsparse_<stem>_<key>`` from csrc/ ``sources``.

    Raises:
        CompilerNotFoundError: no C++ compiler; RuntimeError: the build failed.
        KernelCacheError (a ValueError): the cache directory is writable by other users (naming it).
    """
    _find_compiler()
    from torch.utils.cpp_extension import load  # build time only: it imports setuptools, no vlsparse dependency

    key = _build_key(sources + headers)
    build_dir = _verified_build_dir(key, stem)
    try:
        module = load(
            name=f"vlsparse_{stem}_{key}",
            sources=[str(CSRC / s) for s in sources],
            extra_include_paths=[str(CSRC)],
            extra_cflags=list(CFLAGS),
            extra_ldflags=_ldflags(),
            build_directory=str(build_dir),
            verbose=verbose,
        )
    except Exception as e:  # compiler errors, missing ninja, ...
        raise RuntimeError(f"vlsparse: building the CPU sparse kernel failed in {build_dir}: {e}") from e
    record_digest(build_dir / f"vlsparse_{stem}_{key}.so")
    return module


def simd() -> str:
    """Vector instruction set the kernel was compiled for: 'avx512', 'avx2' or 'scalar'."""
    return load_extension().simd()


def _kernel(kernel: str) -> int:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return KERNELS[kernel]


def kernel_path(kernel: str, tokens: int) -> str:
    """The inner kernel ``kernel`` runs for ``tokens`` tokens: 'insert', 'xreg', 'gather', 'small_rows' or 'strips'."""
    return load_extension().path_name(_kernel(kernel), int(tokens))


def tuning() -> dict[str, int]:
    """The tunables of the auto / gather / strips kernels (csrc/spmm.h ``Tuning``; bytes, rows, columns, tokens)."""
    return dict(load_extension().get_tuning())


def set_tuning(**values: int) -> None:
    """Set tunables of the auto / gather / strips kernels (names as :func:`tuning`; process-wide, not thread-safe:
    for benchmarks and autotuning). The legacy kernel keeps its own. Raises RuntimeError for an unknown name."""
    ext = load_extension()
    for name, value in values.items():
        ext.set_tuning(name, int(value))


def _csr_args(crow_indices, col_indices, values, bias):
    crow = crow_indices.contiguous()
    col = col_indices.contiguous()
    if col.dtype not in (torch.int16, torch.int32):
        col = col.to(torch.int32)
    if crow.dtype != torch.int32:
        crow = crow.to(torch.int32)
    vals = values.contiguous()
    if vals.dtype != torch.float32:
        vals = vals.float()
    b = None
    if bias is not None:
        b = bias.contiguous()
        if b.dtype != torch.float32:
            b = b.float()
    return crow, col, vals, b


def _act(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def spmm_cpu(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
             values: torch.Tensor, bias: torch.Tensor | None = None, *,
             out_features: int, activation: str = "none", kernel: str = "auto") -> torch.Tensor:
    """Y (T, out) float32 = act(x (T, in) @ W.T + bias) with W (out, in) in CSR (crow int32, col int16/int32).

    x must be float32 on the CPU; a non-contiguous x is copied. No autograd. ``kernel``: see the module docstring.
    Raises ValueError for another rank, dtype, activation or kernel.
    """
    if x.dim() != 2:
        raise ValueError(f"spmm_cpu: x must be 2-D (tokens, in_features), got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ValueError(f"spmm_cpu: x must be float32, got {x.dtype}")
    act, path = _act(activation), _kernel(kernel)
    crow, col, vals, b = _csr_args(crow_indices, col_indices, values, bias)  # (out + 1,), (nnz,), (nnz,), (out,)
    return load_extension().spmm(x.contiguous(), crow, col, vals, b, int(out_features), act, path)  # (T, out)


def spmm_cpu_fm(xt: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                values: torch.Tensor, bias: torch.Tensor | None = None, *,
                out_features: int, activation: str = "none", out_layout: str = "feature",
                pad: int = 0, kernel: str = "auto") -> torch.Tensor:
    """Feature-major input xt (in, T) float32 (unit stride along T; else copied).

    out_layout "feature": Y^T (out, T) = act(W @ xt + bias[:, None]), a view of an (out, max(T, pad)) buffer
    whose columns T.. are zero (pad = T rounded up to 16 lets the next layer read it in place); "row":
    Y (T, out). For chains of sparse layers that keep activations feature-major (no transposes).
    ``kernel``: see the module docstring. Raises ValueError for another rank, dtype, activation, layout or kernel.
    """
    if xt.dim() != 2:
        raise ValueError(f"spmm_cpu_fm: xt must be 2-D (in_features, tokens), got shape {tuple(xt.shape)}")
    if xt.dtype != torch.float32:
        raise ValueError(f"spmm_cpu_fm: xt must be float32, got {xt.dtype}")
    if out_layout not in ("feature", "row"):
        raise ValueError(f"out_layout must be 'feature' or 'row', got {out_layout!r}")
    act, path = _act(activation), _kernel(kernel)
    crow, col, vals, b = _csr_args(crow_indices, col_indices, values, bias)  # (out + 1,), (nnz,), (nnz,), (out,)
    return load_extension().spmm_fm(xt, crow, col, vals, b, int(out_features), act,
                                    1 if out_layout == "row" else 0, int(pad), path)  # (out, T) or (T, out)
