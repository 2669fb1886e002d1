"""Latency: interleaved timing of several models, quantiles, and CUDA-graph replay of a PyTorch runner."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vlsparse.runtime.runners import Runner
from vlsparse.sparse.timing import time_interleaved  # the bench's timing, shared with export --autotune

__all__ = ["time_interleaved", "percentile", "cuda_graph_call"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def cuda_graph_call(runner: Runner, batch: Mapping[str, Any]) -> Callable[[], np.ndarray] | None:
    """A function that copies ``batch`` (host arrays, as :meth:`Runner.logits` takes them) into static
    inputs, replays a captured CUDA graph of the runner's module and returns the (B, A) float32 host
    logits; None when the runner has no module (onnxruntime) or the module cannot be captured."""
    if runner.module is None:
        return None
    static = runner.feed(batch)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                runner.call(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = runner.call(static)
    except Exception:  # kernels that sync with the host or allocate cannot be captured
        torch.cuda.synchronize()
        return None

    def run():
        for k, v in runner.feed(batch).items():
            static[k].copy_(v)
        graph.replay()
        return runner.fetch(out)

    return run
