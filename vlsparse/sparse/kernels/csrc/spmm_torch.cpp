// torch extension binding for the vlsparse CPU SpMM kernels in spmm.h.
#include <torch/extension.h>

#include "spmm.h"

namespace {

void check_csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values, int64_t out_features) {
    TORCH_CHECK(crow.device().is_cpu() && col.device().is_cpu() && values.device().is_cpu(),
                "vlsparse spmm_cpu: CSR tensors must be on the CPU");
    TORCH_CHECK(crow.scalar_type() == at::kInt, "vlsparse spmm_cpu: crow_indices must be int32, got ",
                crow.scalar_type());
    TORCH_CHECK(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt,
                "vlsparse spmm_cpu: col_indices must be int16 or int32, got ", col.scalar_type());
    TORCH_CHECK(values.scalar_type() == at::kFloat, "vlsparse spmm_cpu: values must be float32, got ",
                values.scalar_type());
    TORCH_CHECK(crow.dim() == 1 && col.dim() == 1 && values.dim() == 1,
                "vlsparse spmm_cpu: crow_indices, col_indices and values must be 1-D");
    TORCH_CHECK(crow.is_contiguous() && col.is_contiguous() && values.is_contiguous(),
                "vlsparse spmm_cpu: CSR tensors must be contiguous");
    TORCH_CHECK(crow.numel() == out_features + 1, "vlsparse spmm_cpu: crow_indices has ", crow.numel(),
                " entries, expected out_features + 1 = ", out_features + 1);
    TORCH_CHECK(col.numel() == values.numel(), "vlsparse spmm_cpu: col_indices (", col.numel(),
                ") and values (", values.numel(), ") differ in length");
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t out_features) {
    if (!bias.has_value() || !bias->defined()) return nullptr;
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.dim() == 1 && b.is_contiguous() &&
                    b.numel() == out_features,
                "vlsparse spmm_cpu: bias must be a contiguous float32 CPU tensor of shape (out_features,)");
    return b.data_ptr<float>();
}

// x: (tokens, in_features) float32 contiguous -> (tokens, out_features)
at::Tensor spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                const c10::optional<at::Tensor>& bias, int64_t out_features) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
                "vlsparse spmm_cpu: x must be a contiguous 2-D float32 CPU tensor");
    check_csr(crow, col, values, out_features);
    const float* b = bias_ptr(bias, out_features);
    const int64_t tokens = x.size(0), in_features = x.size(1);
    at::Tensor y = at::empty({tokens, out_features}, x.options());
    if (tokens == 0 || out_features == 0) return y;
    {
        pybind11::gil_scoped_release nogil;
        if (col.scalar_type() == at::kShort)
            vlsparse::spmm_f32<int16_t>(x.data_ptr<float>(), tokens, in_features, crow.data_ptr<int32_t>(),
                                        col.data_ptr<int16_t>(), values.data_ptr<float>(), b, out_features,
                                        y.data_ptr<float>());
        else
            vlsparse::spmm_f32<int32_t>(x.data_ptr<float>(), tokens, in_features, crow.data_ptr<int32_t>(),
                                        col.data_ptr<int32_t>(), values.data_ptr<float>(), b, out_features,
                                        y.data_ptr<float>());
    }
    return y;
}

// xt: (in_features, tokens) float32 with unit stride along tokens -> yt (out_features, tokens)
at::Tensor spmm_fm(const at::Tensor& xt, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                   const c10::optional<at::Tensor>& bias, int64_t out_features) {
    TORCH_CHECK(xt.device().is_cpu() && xt.scalar_type() == at::kFloat && xt.dim() == 2,
                "vlsparse spmm_cpu_fm: xt must be a 2-D float32 CPU tensor (in_features, tokens)");
    const bool usable = (xt.size(1) <= 1 || xt.stride(1) == 1) &&
                        (xt.size(0) <= 1 || xt.stride(0) >= std::max<int64_t>(1, xt.size(1)));
    at::Tensor xc = usable ? xt : xt.contiguous();
    check_csr(crow, col, values, out_features);
    const float* b = bias_ptr(bias, out_features);
    const int64_t in_features = xc.size(0), tokens = xc.size(1);
    const int64_t ldx = xc.size(0) > 1 ? xc.stride(0) : std::max<int64_t>(1, tokens);
    at::Tensor yt = at::empty({out_features, tokens}, xc.options());
    if (tokens == 0 || out_features == 0) return yt;
    {
        pybind11::gil_scoped_release nogil;
        if (col.scalar_type() == at::kShort)
            vlsparse::spmm_f32_fm<int16_t>(xc.data_ptr<float>(), tokens, in_features, ldx, crow.data_ptr<int32_t>(),
                                           col.data_ptr<int16_t>(), values.data_ptr<float>(), b, out_features,
                                           yt.data_ptr<float>(), tokens);
        else
            vlsparse::spmm_f32_fm<int32_t>(xc.data_ptr<float>(), tokens, in_features, ldx, crow.data_ptr<int32_t>(),
                                           col.data_ptr<int32_t>(), values.data_ptr<float>(), b, out_features,
                                           yt.data_ptr<float>(), tokens);
    }
    return yt;
}

std::string simd() { return vlsparse::simd_name(); }

int64_t omp_threads() { return vlsparse::detail::num_threads(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "vlsparse CPU CSR SpMM kernels";
    m.def("spmm", &spmm, "Y = X W^T + b, X (T, in) row-major, W in CSR", pybind11::arg("x"),
          pybind11::arg("crow_indices"), pybind11::arg("col_indices"), pybind11::arg("values"),
          pybind11::arg("bias") = pybind11::none(), pybind11::arg("out_features"));
    m.def("spmm_fm", &spmm_fm, "Y^T = W X^T + b, feature-major X^T (in, T) -> Y^T (out, T)", pybind11::arg("xt"),
          pybind11::arg("crow_indices"), pybind11::arg("col_indices"), pybind11::arg("values"),
          pybind11::arg("bias") = pybind11::none(), pybind11::arg("out_features"));
    m.def("simd", &simd, "vector instruction set the kernels were compiled for");
    m.def("omp_threads", &omp_threads, "OpenMP thread count the kernels will use from this thread");
}
