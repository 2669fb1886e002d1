"""pytest-benchmark: SparseLinear CPU backends vs dense F.linear, BERT-base Linear shapes.

Not part of the default `pytest` run (testpaths = tests). Run with

    pytest benchmarks/test_bench_spmm.py --benchmark-group-by=group --benchmark-columns=min,median,rounds

Each group is one (threads, out x in, T, sparsity); compare each backend's median with the
"dense" row of its group (F.linear with the masked weight as a dense fp32 tensor, MKL).
benchmarks/spmm_table.py prints the same comparison as a table of speedups.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from spmm_table import SHAPES, SPARSITIES, TOKENS, check, make_case, make_fns  # noqa: E402

THREADS = [1, 2]
BACKENDS = ["dense", "cpu", "cpu-fm", "torch-sparse", "torch_sparse"]


@pytest.fixture
def num_threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.mark.parametrize("threads", THREADS, ids=[f"t{n}" for n in THREADS])
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=[f"s{int(s * 100)}" for s in SPARSITIES])
@pytest.mark.parametrize("tokens", TOKENS, ids=[f"T{t}" for t in TOKENS])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_spmm(benchmark, num_threads, backend, shape, tokens, sparsity, threads):
    num_threads(threads)
    lin, mask, x = make_case(*shape, tokens, sparsity)
    fn = make_fns(backend, lin, mask, x)
    if fn is None:
        pytest.skip(f"backend {backend} unavailable here")
    with torch.inference_mode():
        check({"dense": make_fns("dense", lin, mask, x), backend: fn})
        benchmark.group = f"threads={threads} {shape[0]}x{shape[1]} T={tokens} sparsity={int(sparsity * 100)}%"
        benchmark.extra_info.update(backend=backend, out=shape[0], inp=shape[1], tokens=tokens,
                                    sparsity=sparsity, threads=threads)
        benchmark(fn)
