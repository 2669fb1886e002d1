// torch extension binding for the vlsparse int8 sparse kernel in spmm_int8.h.
#include <torch/extension.h>

#include "spmm_int8.h"

namespace {

void check(bool ok, const char* what) { TORCH_CHECK(ok, "vlsparse spmm_int8: ", what); }

void check_isa(int64_t isa) {
    check(isa >= -1 && isa <= 2 && (isa < 0 || vlsparse::int8::isa_supported(static_cast<int>(isa))),
          "isa must be -1 (best) or one this CPU supports");
}

bool cpu_contig(const at::Tensor& t, at::ScalarType dtype, int64_t numel) {
    return t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous() && t.numel() == numel;
}

// x (T, in) float32 -> y (T, out) float32, or with raw the int32 accumulations (T, out).
at::Tensor spmm_int8(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& bcol, const at::Tensor& wq,
                     const at::Tensor& sw, const at::Tensor& wsum, const c10::optional<at::Tensor>& bias,
                     int64_t out_features, int64_t activation, int64_t isa, bool raw) {
    check(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
          "x must be a contiguous 2-D float32 CPU tensor");
    check(cpu_contig(crow, at::kInt, out_features + 1), "crow_indices must be int32 (out_features + 1,)");
    const int32_t* cr = crow.data_ptr<int32_t>();
    const int64_t nb = cr[out_features];
    check(cr[0] == 0 && nb >= 0, "crow_indices must start at 0 and end at the block count");
    check(cpu_contig(bcol, bcol.scalar_type(), nb) && (bcol.scalar_type() == at::kShort || bcol.scalar_type() == at::kInt),
          "block_cols must be int16 or int32 with one entry per block");
    check(wq.device().is_cpu() && wq.scalar_type() == at::kChar && wq.is_contiguous() && wq.numel() == 4 * nb,
          "values must be contiguous int8 with 4 per block");
    check(cpu_contig(sw, at::kFloat, out_features), "scales must be float32 (out_features,)");
    check(cpu_contig(wsum, at::kInt, out_features), "row sums must be int32 (out_features,)");
    const float* b = nullptr;
    if (bias.has_value() && bias->defined()) {
        check(cpu_contig(*bias, at::kFloat, out_features), "bias must be float32 (out_features,)");
        b = bias->data_ptr<float>();
    }
    check(activation == 0 || activation == 1, "activation must be 0 (none) or 1 (gelu)");
    check_isa(isa);
    const int64_t tokens = x.size(0), in_features = x.size(1);
    at::Tensor y = at::empty({tokens, out_features}, x.options().dtype(raw ? at::kInt : at::kFloat));
    if (tokens == 0 || out_features == 0) return y;
    const vlsparse::Act act = activation == 1 ? vlsparse::Act::Gelu : vlsparse::Act::None;
    auto run = [&](auto* c) {
        using ColT = std::remove_const_t<std::remove_pointer_t<decltype(c)>>;
        vlsparse::int8::spmm_int8<ColT>(x.data_ptr<float>(), tokens, in_features, crow.data_ptr<int32_t>(), c,
                                        wq.data_ptr<int8_t>(), sw.data_ptr<float>(), wsum.data_ptr<int32_t>(), b,
                                        out_features, raw ? nullptr : y.data_ptr<float>(),
                                        raw ? y.data_ptr<int32_t>() : nullptr, act, static_cast<int>(isa));
    };
    {
        pybind11::gil_scoped_release nogil;
        if (bcol.scalar_type() == at::kShort) run(bcol.data_ptr<int16_t>());
        else run(bcol.data_ptr<int32_t>());
    }
    return y;
}

// The per-token quantisation alone: (xq (T, in) uint8, scale (T,) float32, zero point (T,) int32).
std::vector<at::Tensor> quantize(const at::Tensor& x, int64_t isa) {
    check(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
          "x must be a contiguous 2-D float32 CPU tensor");
    check_isa(isa);
    const int64_t tokens = x.size(0), in = x.size(1), tp = vlsparse::int8::padded_tokens(tokens), kb = (in + 3) / 4;
    at::Tensor packed = at::empty({kb, tp, 4}, x.options().dtype(at::kByte));
    at::Tensor sx = at::empty({tokens}, x.options()), zp = at::empty({tokens}, x.options().dtype(at::kInt));
    vlsparse::int8::quantize_tokens(x.data_ptr<float>(), tokens, in, in, packed.data_ptr<uint8_t>(), tp,
                                    sx.data_ptr<float>(), zp.data_ptr<int32_t>(), static_cast<int>(isa));
    at::Tensor xq = packed.permute({1, 0, 2}).reshape({tp, kb * 4}).narrow(0, 0, tokens).narrow(1, 0, in).contiguous();
    return {xq, sx, zp};
}

std::vector<std::string> isas() {
    std::vector<std::string> out;
    for (int i = vlsparse::int8::kVnni512; i >= vlsparse::int8::kScalar; --i)
        if (vlsparse::int8::isa_supported(i)) out.push_back(vlsparse::int8::isa_name(i));
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "vlsparse int8 sparse (1x4 block) kernels";
    m.def("spmm_int8", &spmm_int8, pybind11::arg("x"), pybind11::arg("crow_indices"), pybind11::arg("block_cols"),
          pybind11::arg("values"), pybind11::arg("scales"), pybind11::arg("row_sums"),
          pybind11::arg("bias") = pybind11::none(), pybind11::arg("out_features"), pybind11::arg("activation") = 0,
          pybind11::arg("isa") = -1, pybind11::arg("raw") = false);
    m.def("quantize", &quantize, pybind11::arg("x"), pybind11::arg("isa") = -1, "per-token asymmetric uint8 quantisation (xq, scale, zero point)");
    m.def("isas", &isas, "ISA paths this CPU can run, best first");
}
