"""Sparse int8 vs dense int8 vs fp32 at the UNITER-base Linear shapes: one table, every ratio from one process.

    python benchmarks/int8_table.py                        # 768x768, 3072x768, 768x3072 (out x in); T 1/40/200;
                                                           # 70% sparse; 2 threads; median of 20 rounds
    python benchmarks/int8_table.py --threads 1 --clock cpu  # CPU time of the calling thread: steadier under load

Columns: the dense fp32 time (F.linear, MKL) in us, then dense fp32 time / each contender's time (> 1: faster
than dense fp32 PyTorch):
    torch-int8     torch.ao.quantization.quantize_dynamic (dense, int8 weights, dynamic per-tensor activations)
    ort-fp32       onnxruntime MatMul + Add on the masked weight (dense)
    ort-int8       onnxruntime.quantization.quantize_dynamic of that model (dense int8, QInt8 weights)
    sparse-fp32    our fp32 CSR kernel (SparseLinear, backend "cpu")
    sparse-int8    our int8 kernel (Int8SparseLinear) on the unstructured mask
    block-int8     our int8 kernel on a 1x4-block mask of the same sparsity (what find-ticket --block 1x4 gives)
and the goal ratios: block-int8 and sparse-int8 against ort-int8 (ort-int8 time / ours).
Rounds are interleaved (every round times every contender back to back, batches of about --batch-ms) so the
other load of the machine hits them alike; medians over the rounds. Thread pools sleep instead of spinning
(OMP_WAIT_POLICY=PASSIVE, onnxruntime allow_spinning=0). The int8 outputs are checked against the masked fp32
layer (relative error below 5% of the output range) before timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spmm_table import make_case, measure  # noqa: E402

from vlsparse.runtime.bundle import ONNX_FILE  # noqa: E402
from vlsparse.runtime.quantize import quantize_onnx, quantize_torch  # noqa: E402
from vlsparse.sparse.int8 import Int8SparseLinear  # noqa: E402
from vlsparse.sparse.kernels import cpu_int8  # noqa: E402
from vlsparse.sparse.linear import SparseLinear  # noqa: E402

SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # (out, in)
CONTENDERS = ["torch-int8", "ort-fp32", "ort-int8", "sparse-fp32", "sparse-int8", "block-int8"]


def ort_sessions(w: torch.Tensor, b: torch.Tensor, threads: int, tmp: Path):
    """(fp32, int8) onnxruntime sessions of y = x @ w.T + b, the int8 one quantised as the bench's onnx int8
    baseline (:func:`vlsparse.runtime.quantize.quantize_onnx`: quantize_dynamic, QInt8 weights)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", out_f])],
        [numpy_helper.from_array(w.t().contiguous().numpy(), "wt"), numpy_helper.from_array(b.numpy(), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fp32_dir = Path(tempfile.mkdtemp(prefix=f"l{out_f}x{in_f}-", dir=tmp))  # one per case (shape x tokens)
    onnx.save(model, str(fp32_dir / ONNX_FILE))
    fp32, int8 = fp32_dir / ONNX_FILE, quantize_onnx(fp32_dir, fp32_dir / "int8") / ONNX_FILE
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return [ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in (fp32, int8)]


def contenders(lin, mask, x, threads: int, tmp: Path) -> dict:
    """name -> zero-argument callable returning (T, out) float32."""
    w, b = (lin.weight * mask).detach().contiguous(), lin.bias.detach()
    masked = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        masked.weight.copy_(w)
        masked.bias.copy_(b)
    tq = quantize_torch(torch.nn.Sequential(masked))  # the bench's dense int8 baseline
    s32, s8 = ort_sessions(w, b, threads, tmp)
    xn = x.numpy()
    g = torch.Generator().manual_seed(1)  # the same sparsity in whole 1x4 blocks, kept at random
    bmask = (torch.rand(w.shape[0], w.shape[1] // 4, generator=g) < mask.float().mean().item()).repeat_interleave(4, 1)
    sparse, i8 = SparseLinear.from_dense(lin, mask, backend="cpu"), Int8SparseLinear.from_dense(lin, mask, "cpu")
    b8 = Int8SparseLinear.from_dense(lin, bmask, "cpu")
    return {"dense": lambda: F.linear(x, w, b), "torch-int8": lambda: tq(x),
            "ort-fp32": lambda: torch.from_numpy(s32.run(None, {"x": xn})[0]),
            "ort-int8": lambda: torch.from_numpy(s8.run(None, {"x": xn})[0]),
            "sparse-fp32": lambda: sparse(x), "sparse-int8": lambda: i8(x),
            "block-int8": (lambda: b8(x), lambda: F.linear(x, lin.weight * bmask, b))}


def check(fns: dict) -> dict:
    """The callables, each checked against its fp32 reference (masked dense): error <= 5% of the output range."""
    ref = fns["dense"]()
    out = {}
    for name, fn in fns.items():
        fn, r = (fn if isinstance(fn, tuple) else (fn, None))
        r = ref if r is None else r().detach()
        err = (fn() - r).abs().max().item()
        if err > 0.05 * r.abs().max().item() + 1e-6:
            raise AssertionError(f"{name}: max abs error {err:.3g} against the masked fp32 layer")
        out[name] = fn
    return out


def run(shapes, tokens, sparsity: float, threads: int, rounds: int, batch_ms: float, clock: str = "wall",
        out=print) -> None:
    torch.set_num_threads(threads)
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    out(f"# dense fp32 time / contender time ({clock} clock), {threads} threads, {sparsity:.0%} sparse, median of {rounds} "
        f"interleaved rounds; int8 kernel isa {cpu_int8.isas()[0]}; torch {torch.__version__}; "
        f"load avg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    head = ["out x in", "T", "dense fp32 us", *CONTENDERS, "sparse-int8 / ort-int8", "block-int8 / ort-int8"]
    out("| " + " | ".join(head) + " |")
    out("|" + "|".join("---" for _ in head) + "|")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for out_f, in_f in shapes:
            for t in tokens:
                lin, mask, x = make_case(out_f, in_f, t, sparsity)
                med = measure(check(contenders(lin, mask, x, threads, Path(tmp))), rounds, batch_ms, clock=timer)
                cells = [f"{out_f}x{in_f}", str(t), f"{med['dense'] * 1e6:.0f}"]
                cells += [f"{med['dense'] / med[c]:.2f}" for c in CONTENDERS]
                cells += [f"{med['ort-int8'] / med[c]:.2f}" for c in ("sparse-int8", "block-int8")]
                out("| " + " | ".join(cells) + " |")
    out(f"# load avg after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 40, 200])
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch-ms", type=float, default=4.0)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this thread's CPU time (needs --threads 1; every contender then runs on the calling "
                        "thread), which other load on the machine does not inflate")
    a = p.parse_args(argv)
    if a.clock == "cpu" and a.threads != 1:
        p.error("--clock cpu needs --threads 1")
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes]
    run(shapes, a.tokens, a.sparsity, a.threads, a.rounds, a.batch_ms, a.clock)


if __name__ == "__main__":
    main()
