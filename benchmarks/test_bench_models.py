"""Whole-model latency at the base configuration: UNITER-base in four formats (pytest-benchmark).

uniter-base (12 layers x 768, random init, 2048-d region features, 3,129 answers) with its 72
encoder Linears masked to 50 / 70 / 90% global sparsity (global magnitude over the random weights,
or random masks with VLSPARSE_BENCH_MASK=random), run end to end (host inputs -> host logits) on
batches of 1 and 8 questions of 20 text tokens + 36 regions, as

    dense        the masked model in PyTorch (F.linear / MKL)
    csr          SparseLinear with our C++ kernel (vlsparse.export.load_sparse, backend "cpu")
    onnx         the dense ONNX export in stock onnxruntime
    onnx-sparse  the ONNX export with the Linears as vlsparse.SparseLinear (our custom op)

The models come from vlsparse.bench (levels.export_formats, formats.load_format), as in `vlsparse bench`.
Every case first checks its logits against the dense PyTorch model. Run

    pytest benchmarks/test_bench_models.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=min,median,iqr,rounds --benchmark-save=models

and compare later runs with ``--benchmark-compare``. Each group is one (sparsity, batch): read the
formats against each other inside a group. Building one sparsity (exports of a 110M-parameter model)
takes 1-2 minutes; only one sparsity is kept in memory at a time.

Environment: VLSPARSE_BENCH_THREADS (default 2, the target machine's cores), VLSPARSE_BENCH_MASK
(magnitude | random), VLSPARSE_BENCH_TEXT (20), VLSPARSE_BENCH_REGIONS (36), VLSPARSE_BENCH_SPIN
(1; 0 turns off onnxruntime's spin-waiting threads). On a machine shared with other work, run with
OMP_WAIT_POLICY=PASSIVE VLSPARSE_BENCH_SPIN=0: spinning thread pools there make 2-thread times
mostly a measure of the scheduler (seen: dense PyTorch 4.3 s instead of 0.27 s per batch).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("pytest_benchmark")

from vlsparse.bench.formats import load_format  # noqa: E402
from vlsparse.bench.levels import export_formats  # noqa: E402
from vlsparse.runtime.runners import FORMATS  # noqa: E402
from vlsparse.models import load_model  # noqa: E402
from vlsparse.pruning.magnitude import global_magnitude_prune, random_prune  # noqa: E402
from vlsparse.pruning.mask import apply_mask, ones_mask  # noqa: E402

THREADS = int(os.environ.get("VLSPARSE_BENCH_THREADS", "2"))
MASK = os.environ.get("VLSPARSE_BENCH_MASK", "magnitude")
TEXT = int(os.environ.get("VLSPARSE_BENCH_TEXT", "20"))
REGIONS = int(os.environ.get("VLSPARSE_BENCH_REGIONS", "36"))
SPIN = os.environ.get("VLSPARSE_BENCH_SPIN", "1") != "0"
SPARSITIES = [0.5, 0.7, 0.9]
BATCHES = [1, 8]
# sparsity outermost, so each sparsity's models are built once
CASES = [(s, b, f) for s in SPARSITIES for b in BATCHES for f in FORMATS]


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(THREADS)
    model, _ = load_model("uniter-base", img_dim=2048, num_answers=3129, seed=0)
    return model


_built: dict = {}


def _models(base, sparsity: float) -> dict:
    """format -> Runner for one sparsity (the previous sparsity's models are dropped first)."""
    if _built.get("sparsity") != sparsity:
        if "dir" in _built:
            shutil.rmtree(_built["dir"], ignore_errors=True)
        _built.clear()
        scope = base.prune_scope()
        full = ones_mask(base, scope)
        params = dict(base.named_parameters())
        mask = (random_prune(full, sparsity, seed=0) if MASK == "random"
                else global_magnitude_prune({n: params[n] for n in scope}, full, sparsity))
        state = {k: v.clone() for k, v in base.state_dict().items()}
        with torch.no_grad():
            apply_mask(base, mask)
        work = tempfile.mkdtemp(prefix="vlsparse-bench-models-")
        try:
            paths = export_formats(base, mask, FORMATS, work)
        finally:
            base.load_state_dict(state)
        _built.update(sparsity=sparsity, dir=work, runners={f: load_format(f, paths[f], threads=THREADS, spin=SPIN)
                                                            for f in FORMATS}, checked=set())
    return _built["runners"]


@pytest.mark.parametrize("sparsity,batch,fmt", CASES, ids=[f"s{int(s * 100)}-b{b}-{f}" for s, b, f in CASES])
def test_model_latency(benchmark, base, sparsity, batch, fmt):
    runners = _models(base, sparsity)
    inputs = base.example_inputs(batch=batch, text_len=TEXT, regions=REGIONS)
    runner = runners[fmt]
    if (batch, fmt) not in _built["checked"]:
        ref = runners["dense"].logits(inputs)
        torch.testing.assert_close(runner.logits(inputs), ref, atol=2e-3, rtol=1e-3)
        _built["checked"].add((batch, fmt))
    feed = runner.feed(inputs)
    benchmark.group = f"uniter-base {MASK} s{int(sparsity * 100)} batch {batch}"
    benchmark.extra_info.update(format=fmt, sparsity=sparsity, batch=batch, threads=THREADS, text=TEXT,
                                regions=REGIONS, mask=MASK, spin=SPIN,
                                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    benchmark(lambda: runner.fetch(runner.call(feed)))
