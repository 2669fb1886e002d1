"""Issue 17, item 1: compiled libraries are loaded from the cache only when verified. The onnxruntime op library
and the PyTorch extension record their sha256 at build time; a planted or altered library is rebuilt, never
loaded; the cache directory is created 0700 and one that others can write to is refused with one line naming it.
The compilers are stubbed (these tests check the cache, not the build, which test_onnx_sparse and
test_sparse_linear cover)."""

from __future__ import annotations

import hashlib
import stat
import sys
import types

import pytest

from vlsparse.sparse.kernels import cpu
from vlsparse.sparse.kernels import ort as ort_lib


@pytest.fixture
def stub_ort_build(tmp_path, monkeypatch):
    """VLSPARSE_CACHE in tmp_path, and a 'compiler' that writes a known library; returns the list of builds."""
    monkeypatch.setenv("VLSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_lib, "_built", {})
    builds = []

    def compile_stub(cxx, lib):
        builds.append(lib)
        lib.write_bytes(b"\x7fELF the library vlsparse built")

    monkeypatch.setattr(ort_lib, "_compile", compile_stub)
    return builds


def test_a_planted_op_library_is_rebuilt_not_loaded(tmp_path, stub_ort_build):
    key = ort_lib._key(ort_lib._compiler_version(ort_lib._compiler()))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    planted = cache / f"vlsparse_ort-{key}.so"  # the predictable name
    planted.write_bytes(b"\x7fELF a library someone else put there")
    lib = ort_lib.custom_op_library()
    assert lib == planted and stub_ort_build == [lib] and lib.read_bytes().endswith(b"vlsparse built")
    assert (cache / f"{lib.name}.sha256").read_text().split()[0] == hashlib.sha256(lib.read_bytes()).hexdigest()
    ort_lib._built.clear()
    assert ort_lib.custom_op_library() == lib and len(stub_ort_build) == 1  # verified: loaded, not rebuilt
    lib.write_bytes(b"\x7fELF altered after the build")
    ort_lib._built.clear()
    assert ort_lib.custom_op_library() == lib and len(stub_ort_build) == 2  # altered: rebuilt
    assert lib.read_bytes().endswith(b"vlsparse built")


def test_the_cache_key_covers_the_vlsparse_version(monkeypatch):
    import vlsparse._version

    key = ort_lib._key("g++ 13")
    monkeypatch.setattr(vlsparse._version, "__version__", "99.0.0")
    assert ort_lib._key("g++ 13") != key
    assert ort_lib._key("g++ 14") != ort_lib._key("g++ 13")


def test_the_cache_directory_is_private(tmp_path, stub_ort_build):
    lib = ort_lib.custom_op_library()
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700 and lib.parent == tmp_path / "cache"
    (tmp_path / "cache").chmod(0o777)
    ort_lib._built.clear()
    with pytest.raises(ValueError) as info:
        ort_lib.custom_op_library()
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "cache") in msg and "writable by other users" in msg, msg


def test_a_planted_torch_extension_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu, "_module", None)
    key = cpu._build_key()
    build = tmp_path / "cache" / f"spmm_{key}"
    build.mkdir(parents=True)
    (build / f"vlsparse_spmm_{key}.so").write_bytes(b"planted")
    (build / "build.ninja").write_text("# says the planted library is up to date\n")
    seen = []

    def load_stub(name, build_directory, **kw):  # stands for torch.utils.cpp_extension.load
        seen.append(sorted(p.name for p in build.iterdir()))
        (build / f"{name}.so").write_bytes(b"built by torch")
        return types.SimpleNamespace(simd=lambda: "stub")

    monkeypatch.setitem(sys.modules, "torch.utils.cpp_extension", types.SimpleNamespace(load=load_stub))
    assert cpu.load_extension().simd() == "stub"
    assert seen == [[]]  # the planted library and its build files were removed before building
    assert (build / f"vlsparse_spmm_{key}.so.sha256").is_file()
    monkeypatch.setattr(cpu, "_module", None)
    cpu.load_extension()
    assert seen[1] == [f"vlsparse_spmm_{key}.so", f"vlsparse_spmm_{key}.so.sha256"]  # verified: kept
    (build).chmod(0o777)
    monkeypatch.setattr(cpu, "_module", None)
    with pytest.raises(ValueError, match="writable by other users"):
        cpu.load_extension()
