"""Benchmark a run's tickets as deployable models: accuracy, latency, memory and size (``vlsparse bench``).

For every level of a run (the IMP levels, level 0 being the dense model, and the random-pruning
levels of a main job, ``OUT/random/level_XX``) and every format, :func:`vlsparse.bench.run.bench_run`
builds the model in a temporary directory and measures it on one device (each format through its
:class:`vlsparse.runtime.runners.Runner`, the one ``vlsparse.Pipeline`` uses):

    dense        the masked model in PyTorch (nn.Linear holding the pruned zeros): the reference
    csr          export_csr + load_sparse: SparseLinear with our C++ kernel on the CPU, Triton on CUDA
    onnx         export_onnx, stock onnxruntime (dense MatMuls with the zeros)
    onnx-sparse  the same graph with every Linear of >= 50% zeros as vlsparse.SparseLinear (our custom op)

in each dtype of ``--dtypes``: fp32; on CUDA fp16 (the PyTorch formats, cast at load); on the CPU int8 (the
issue "Sparse and int8 together"), the dense baselines through dynamic quantisation
(:mod:`vlsparse.runtime.quantize`: dense = PyTorch's ``quantize_dynamic`` at load, onnx = onnxruntime's
``quantize_dynamic`` of the onnx export) and ours as ``export --format csr --dtype int8`` (Int8SparseLinear on
our int8 kernel; unstructured or 1x4-block, as the ticket is) and as ``export --format onnx --sparse --dtype int8``
(vlsparse.SparseLinearInt8 nodes, the same kernel in onnxruntime). A pair that does not exist
(:data:`vlsparse.runtime.runners.UNAVAILABLE`: fp16 ONNX) is skipped with one line saying
why (progress output, ``bench.json`` settings "skipped", the end of ``summary.md``).

Weights: the level's trained subnetwork (``level_XX/weights.safetensors``) where there is one, else
θ0 (``RUN/theta0.safetensors``) under the level's mask, which is enough for latency, memory and size
(no metric is reported for it).

Columns of ``REPORT/bench.csv`` (one row per level x format x dtype x batch size; fractions in
[0, 1], times in ms, sizes in bytes):

    session, method (imp | random), level, sparsity, trained, format, device, dtype, threads,
    batch_size, tokens (text tokens + regions in the batch, padding excluded),
    median_ms, p90_ms, repeats: end-to-end time of one batch (host arrays in, host logits out)
        over ``repeats`` calls after ``warmup`` calls. All formats of a level are timed in one
        process, interleaved call by call (round robin, rotating order), on the same inputs;
    tokens_per_s: tokens / median time;
    speedup_vs_dense, speedup_vs_onnx: median of the dense PyTorch (resp. onnxruntime dense) model of
        the same level and dtype / this median, both measured in that same process and round robin (int8 rows:
        against the dense int8 baselines; against dense fp32, divide the fp32 dense row's median_ms by theirs);
    metric_name, metric: the task metric on the first ``max_questions`` test questions (trained
        weights only); run_metric: the test metric the run recorded (its metrics.json, whole split);
    questions, same_pred, max_abs_diff: on those questions, the fraction of arg-max answers equal to
        the masked dense PyTorch model's (fp32, same device) and the largest absolute logit difference;
    disk_bytes: the format's model files (config.json, model.safetensors or model.onnx[.data]; dense int8,
        quantised at load, has no files of its own and shows the dense fp32 files);
        weight_mem_bytes: weight tensors the runtime holds (PyTorch parameters and buffers, and the packed
        weights of quantize_dynamic's Linears; ONNX initializers); linear_disk_bytes: the pruned Linear weights as
        stored (dense fp32, CSR or bitmask + values, CSR initializers; csr int8: bitmask + int8 values + scales;
        onnx int8: int8 weights, zero points and scales); linear_ratio: that over their
        dense fp32 size;
    peak_mem_bytes, model_mem_bytes, memory: "rss-subprocess": peak RSS of a fresh Python process
        that imports torch and onnxruntime, loads the format and runs the largest batch, and that
        peak minus the process's RSS before loading; "rss-delta": the same delta measured in this
        process (peak reset through /proc/self/clear_refs; no peak column); "cuda-allocated":
        torch.cuda.max_memory_allocated() and its increase over loading and the largest batch;
    steady_mem_bytes: "rss-subprocess" only: the RSS of that fresh process after loading and three
        calls, once Python's garbage and glibc's free heap pages are released (what the model keeps);
    cuda_graph: whether the CUDA timing replayed a CUDA graph.

``REPORT/bench.json`` holds the same rows and, per session, the machine (CPU model, logical CPUs,
threads, load average before and after, torch / onnxruntime / onnx versions, GPU name) and the
settings. Plots (PNG, of the fp32 rows): ``metric_vs_sparsity.png`` (IMP vs random pruning vs dense),
``metric_vs_latency.png`` (one panel per batch size), ``size_vs_sparsity.png`` (whole model on disk
and pruned-Linear ratio). ``REPORT/summary.md`` is a Markdown table of the same numbers (every dtype).

Interrupting keeps every row already written (the CSV is rewritten atomically after each row,
bench.json and summary.md after each level, the plots at the end); a re-run with the same ``--out``
measures only the rows that are missing, and a run with nothing missing rewrites the report files.

Modules: ``run`` (Settings, bench_run), ``levels`` (a run's levels, masked models, exports), ``formats``
(loading and sizing the exports), ``timing`` (interleaved latency, CUDA graphs), ``memory`` (memory
probes; ``python -m vlsparse.bench.memory --probe`` is the fresh process), ``report`` (bench.csv,
bench.json, summary.md, plots).
"""

from __future__ import annotations


class BenchError(ValueError):
    """Bad benchmark input: a run without levels, an unknown format, a device that is not there."""
