// torch extension binding for the vlsparse CPU SpMM kernels in spmm.h.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <map>
#include <string>

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

vlsparse::Path path_of(int64_t path) {
    TORCH_CHECK(path >= 0 && path <= 5, "vlsparse spmm_cpu: path must be 0 (auto), 1 (legacy), 2 (gather), 3 "
                "(strips), 4 (xreg) or 5 (insert), got ", path);
    return static_cast<vlsparse::Path>(path);
}

vlsparse::Act act_of(int64_t activation) {
    TORCH_CHECK(activation == 0 || activation == 1, "vlsparse spmm_cpu: activation must be 0 (none) or 1 (gelu), got ",
                activation);
    return activation == 1 ? vlsparse::Act::Gelu : vlsparse::Act::None;
}

// x: (tokens, in_features) float32 contiguous -> (tokens, out_features)
at::Tensor spmm(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t activation, int64_t path) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
                "vlsparse spmm_cpu: x must be a contiguous 2-D float32 CPU tensor");
    check_csr(crow, col, values, out_features);
    const float* b = bias_ptr(bias, out_features);
    const vlsparse::Act act = act_of(activation);
    const vlsparse::Path pa = path_of(path);
    const int64_t tokens = x.size(0), in_features = x.size(1);
    at::Tensor y = at::empty({tokens, out_features}, x.options());
    if (tokens == 0 || out_features == 0) return y;
    {
        pybind11::gil_scoped_release nogil;
        if (col.scalar_type() == at::kShort)
            vlsparse::spmm_f32<int16_t>(x.data_ptr<float>(), tokens, in_features, crow.data_ptr<int32_t>(),
                                        col.data_ptr<int16_t>(), values.data_ptr<float>(), b, out_features,
                                        y.data_ptr<float>(), act, vlsparse::OmpFor(), pa);
        else
            vlsparse::spmm_f32<int32_t>(x.data_ptr<float>(), tokens, in_features, crow.data_ptr<int32_t>(),
                                        col.data_ptr<int32_t>(), values.data_ptr<float>(), b, out_features,
                                        y.data_ptr<float>(), act, vlsparse::OmpFor(), pa);
    }
    return y;
}

// xt: (in_features, tokens) float32 with unit stride along tokens (row stride >= tokens).
// out_layout 0: yt (out_features, tokens) feature-major, its rows `pad` floats apart (pad >= tokens; the
// returned tensor is the (out, tokens) view, columns tokens..pad-1 of the buffer zero); 1: y (tokens,
// out_features) row-major.
at::Tensor spmm_fm(const at::Tensor& xt, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                   const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t activation, int64_t out_layout,
                   int64_t pad, int64_t path) {
    TORCH_CHECK(xt.device().is_cpu() && xt.scalar_type() == at::kFloat && xt.dim() == 2,
                "vlsparse spmm_cpu_fm: xt must be a 2-D float32 CPU tensor (in_features, tokens)");
    const bool usable = (xt.size(1) <= 1 || xt.stride(1) == 1) &&
                        (xt.size(0) <= 1 || xt.stride(0) >= std::max<int64_t>(1, xt.size(1)));
    at::Tensor xc = usable ? xt : xt.contiguous();
    check_csr(crow, col, values, out_features);
    const float* b = bias_ptr(bias, out_features);
    const vlsparse::Act act = act_of(activation);
    const vlsparse::Path pa = path_of(path);
    const int64_t in_features = xc.size(0), tokens = xc.size(1);
    const int64_t ldx = xc.size(0) > 1 ? xc.stride(0) : std::max<int64_t>(1, tokens);
    const int64_t ldy = std::max(tokens, pad);
    at::Tensor buf = out_layout == 1 ? at::empty({tokens, out_features}, xc.options())
                                     : at::empty({out_features, ldy}, xc.options());
    if (out_layout != 1 && ldy > tokens) buf.narrow(1, tokens, ldy - tokens).zero_();
    at::Tensor out = out_layout == 1 ? buf : buf.narrow(1, 0, tokens);
    if (tokens == 0 || out_features == 0) return out;
    auto run = [&](auto* c) {  // c: int16_t* or int32_t* column indices
        using ColT = std::remove_const_t<std::remove_pointer_t<decltype(c)>>;
        const float* x = xc.data_ptr<float>();
        const int32_t* cr = crow.data_ptr<int32_t>();
        if (out_layout == 1)
            vlsparse::spmm_f32_fm_rm<ColT>(x, tokens, in_features, ldx, cr, c, values.data_ptr<float>(), b,
                                           out_features, buf.data_ptr<float>(), act, vlsparse::OmpFor(), pa);
        else
            vlsparse::spmm_f32_fm<ColT>(x, tokens, in_features, ldx, cr, c, values.data_ptr<float>(), b,
                                        out_features, buf.data_ptr<float>(), ldy, act, vlsparse::OmpFor(), pa);
    };
    {
        pybind11::gil_scoped_release nogil;
        if (col.scalar_type() == at::kShort)
            run(col.data_ptr<int16_t>());
        else
            run(col.data_ptr<int32_t>());
    }
    return out;
}

std::string simd() { return vlsparse::simd_name(); }

int64_t omp_threads() { return vlsparse::detail::num_threads(); }

std::string path_name(int64_t path, int64_t tokens) { return vlsparse::path_name(path_of(path), tokens); }

// The tunables of the non-legacy paths (vlsparse::tuning()), by name.
std::map<std::string, int64_t> get_tuning() {
    const vlsparse::Tuning& t = vlsparse::tuning();
    return {{"row_block", t.row_block}, {"l1_block_bytes", t.l1_block_bytes}, {"min_block_cols", t.min_block_cols},
            {"l2_strip_bytes", t.l2_strip_bytes}, {"small_tokens", t.small_tokens}, {"max_vectors", t.max_vectors},
            {"insert_tokens", t.insert_tokens}, {"wide_min_in", t.wide_min_in}};
}

void set_tuning(const std::string& name, int64_t value) {
    vlsparse::Tuning& t = vlsparse::tuning();
    TORCH_CHECK(value >= 0, "vlsparse set_tuning: ", name, " must be >= 0, got ", value);
    if (name == "row_block") t.row_block = value;
    else if (name == "l1_block_bytes") t.l1_block_bytes = value;
    else if (name == "min_block_cols") t.min_block_cols = value;
    else if (name == "l2_strip_bytes") t.l2_strip_bytes = value;
    else if (name == "small_tokens") t.small_tokens = value;
    else if (name == "max_vectors") t.max_vectors = value;
    else if (name == "insert_tokens") t.insert_tokens = value;
    else if (name == "wide_min_in") t.wide_min_in = value;
    else TORCH_CHECK(false, "vlsparse set_tuning: unknown tunable ", name);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "vlsparse CPU CSR SpMM kernels";
    m.def("spmm", &spmm, "Y = act(X W^T + b), X (T, in) row-major, W in CSR", pybind11::arg("x"),
          pybind11::arg("crow_indices"), pybind11::arg("col_indices"), pybind11::arg("values"),
          pybind11::arg("bias") = pybind11::none(), pybind11::arg("out_features"), pybind11::arg("activation") = 0,
          pybind11::arg("path") = 0);
    m.def("spmm_fm", &spmm_fm, "feature-major X^T (in, T) -> Y^T (out, T) (out_layout 0) or Y (T, out) (1)",
          pybind11::arg("xt"), pybind11::arg("crow_indices"), pybind11::arg("col_indices"), pybind11::arg("values"),
          pybind11::arg("bias") = pybind11::none(), pybind11::arg("out_features"), pybind11::arg("activation") = 0,
          pybind11::arg("out_layout") = 0, pybind11::arg("pad") = 0, pybind11::arg("path") = 0);
    m.def("simd", &simd, "vector instruction set the kernels were compiled for");
    m.def("omp_threads", &omp_threads, "OpenMP thread count the kernels will use from this thread");
    m.def("path_name", &path_name, "inner kernel a path (0 auto, 1 legacy, 2 gather, 3 strips, 4 xreg, 5 insert) runs for T tokens");
    m.def("get_tuning", &get_tuning, "tunables of the auto / gather / strips paths");
    m.def("set_tuning", &set_tuning, "set one tunable of the auto / gather / strips paths (not thread-safe)");
}
