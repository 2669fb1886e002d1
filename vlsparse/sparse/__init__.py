"""Sparse weights and what multiplies them: CSR / bitmask formats, SparseLinear, the SpMM kernels (C++ CPU, Triton GPU, the onnxruntime op library). Knows nothing of models."""
