// vlsparse gather-dot kernels for one to a few tokens: Y = X W^T + bias, W (out x in) in CSR by output row.
// Two of them: the vgatherdps gather-dot (gather_tokens, Path::Gather) described first, and the insert-dot
// (insert_tokens, Path::Insert and Path::Auto at T = 1) further down.
//
// Part of spmm.h (included by it after its vector abstraction detail::V, hsum and gelu_erf; not a standalone
// header). Runs for Path::Gather (at every token count); Path::Auto does not pick it: on the 2-core Zen 4
// it measured 0.68-0.76x the speed of small_rows at T = 1 (README, "Kernel paths").
//
// Element (t, c) of X at x[t * xs_t + c * xs_c] (row-major X: xs_t = in, xs_c = 1; feature-major X^T:
// xs_t = 1, xs_c = ldx), float32; output (t, o) at y[t * ys_t + o * ys_o]. Per output row o, the row's
// nonzeros are taken W at a time (W = V::W: 16 floats on AVX-512, 8 on AVX2, 1 scalar): one load of W
// column indices (int16 widened to int32 lanes, times xs_c when xs_c != 1), one load of W values, then for
// each of the pass's TT <= 4 tokens one gather of x[t, col[k..k+W)] (vgatherdps) and one FMA into that
// token's accumulator: the index and value loads are shared by the pass's tokens. Two accumulator chains
// (2W nonzeros per step) let two gathers per token be in flight. The row's last 1..W-1 nonzeros use a
// masked gather (masked-off lanes read nothing), so rows of any length, empty rows included, are exact.
// Horizontal sums, bias and the epilogue per (row, token) at the end.
//
// Source: the vectorised CSR SpMV of Liu, Smelyanskiy, Chow and Dubey ("Efficient sparse matrix-vector
// multiplication on x86-based many-core processors", ICS 2013): values and indices loaded as vectors, x
// gathered by the index vector, one FMA per W nonzeros, a horizontal sum per row. Per nonzero it loads
// 4 bytes of value, 2 (int16) or 4 bytes of index and one 4-byte x[c] for 2 flops per token; the
// scalar-buffer kernel it replaces (small_rows in spmm.h, still Path::Legacy) issues two scalar loads and a
// store per nonzero (values as vectors), this one (2 + TT gathers) vector instructions per W nonzeros. Which
// is faster on a given CPU is measured, not assumed: benchmarks/spmm_table.py times both side by side
// (backends cpu and cpu-legacy).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace vlsparse {
namespace detail {

constexpr int kGatherTT = 4;  // tokens per gather pass (accumulators: 2 * kGatherTT vectors)

// Whether every lane index col * xs_c (col < in_features) fits the gather's int32 lanes.
inline bool gather_fits(int64_t in_features, int64_t xs_c) {
    return xs_c == 1 || (in_features - 1) * xs_c <= static_cast<int64_t>(std::numeric_limits<int32_t>::max());
}

// Rows [r0, r1) for TT tokens (x, y already offset to the pass's first token). UnitC: xs_c == 1.
// noinline: compiled on its own, like small_rows in spmm.h (GCC keeps the loop tight that way).
template <int TT, bool UnitC, typename ColT>
VLS_NOINLINE void gather_rows(const float* __restrict x, int64_t xs_t, int64_t xs_c, const int32_t* __restrict crow,
                              const ColT* __restrict col, const float* __restrict val, const float* __restrict bias,
                              int64_t r0, int64_t r1, float* __restrict y, int64_t ys_t, int64_t ys_o, Act act) {
    using T = typename V::T;
    using I = typename V::I;
    constexpr int W = V::W;
    const int32_t sc = static_cast<int32_t>(xs_c);
    for (int64_t o = r0; o < r1; ++o) {
        T a0[TT], a1[TT];
        for (int t = 0; t < TT; ++t) {
            a0[t] = V::zero();
            a1[t] = V::zero();
        }
        int64_t k = crow[o];
        const int64_t end = crow[o + 1];
        for (; k + 2 * W <= end; k += 2 * W) {
            I i0 = V::idx(col + k), i1 = V::idx(col + k + W);
            if (!UnitC) {
                i0 = V::scale(i0, sc);
                i1 = V::scale(i1, sc);
            }
            const T w0 = V::load(val + k), w1 = V::load(val + k + W);
            for (int t = 0; t < TT; ++t) {
                a0[t] = V::fma(w0, V::gather(x + t * xs_t, i0), a0[t]);
                a1[t] = V::fma(w1, V::gather(x + t * xs_t, i1), a1[t]);
            }
        }
        for (; k < end; k += W) {  // 1 .. 2W - 1 left: whole vectors, then one masked
            const int n = static_cast<int>(std::min<int64_t>(W, end - k));
            const typename V::M m = V::mask(n);
            ColT ib[W] = {};  // the indices, zero-padded (never read past the row's end)
            std::memcpy(ib, col + k, static_cast<size_t>(n) * sizeof(ColT));
            I i0 = V::idx(ib);
            if (!UnitC) i0 = V::scale(i0, sc);
            const T w0 = V::loadm(val + k, m);
            for (int t = 0; t < TT; ++t) a0[t] = V::fma(w0, V::gatherm(x + t * xs_t, i0, m), a0[t]);
        }
        const float b = bias ? bias[o] : 0.0f;
        for (int t = 0; t < TT; ++t) {
            const float v = hsum(V::add(a0[t], a1[t])) + b;
            y[t * ys_t + o * ys_o] = act == Act::Gelu ? gelu_erf(v) : v;
        }
    }
}

// All tokens by gather-dot: rows in blocks of 64 spread with par; in each block the tokens in passes of up to
// kGatherTT (each pass walks the block's nonzeros once). Needs gather_fits(in_features, xs_c).
template <typename ColT, typename Par>
void gather_tokens(const float* x, int64_t tokens, int64_t xs_t, int64_t xs_c, const int32_t* crow, const ColT* col,
                   const float* val, const float* bias, int64_t out_features, float* y, int64_t ys_t, int64_t ys_o,
                   Act act, const Par& par) {
    using Fn = void (*)(const float*, int64_t, int64_t, const int32_t*, const ColT*, const float*, const float*,
                        int64_t, int64_t, float*, int64_t, int64_t, Act);
    static constexpr Fn kFns[2][kGatherTT] = {
        {&gather_rows<1, false, ColT>, &gather_rows<2, false, ColT>, &gather_rows<3, false, ColT>,
         &gather_rows<4, false, ColT>},
        {&gather_rows<1, true, ColT>, &gather_rows<2, true, ColT>, &gather_rows<3, true, ColT>,
         &gather_rows<4, true, ColT>}};
    const int unit = xs_c == 1 ? 1 : 0;
    const int64_t nblk = (out_features + 63) / 64;
    par(nblk, [&](int64_t b) {
        const int64_t r0 = b * 64, r1 = std::min(out_features, r0 + 64);
        for (int64_t t0 = 0; t0 < tokens; t0 += kGatherTT) {
            const int64_t tt = std::min<int64_t>(kGatherTT, tokens - t0);
            kFns[unit][tt - 1](x + t0 * xs_t, xs_t, xs_c, crow, col, val, bias, r0, r1, y + t0 * ys_t, ys_t, ys_o,
                               act);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Insert-dot kernel (one token per pass; SSE4.1 and up): per 16 nonzeros of a row, x[c] fetched by 16
// scalar loads that vinsertps places straight into four xmm registers (no store to a buffer and reload, as
// small_rows does), int16 indices read four at a time (one 64-bit load, shifts), values by 4-float loads,
// four independent xmm FMA chains. Per nonzero: ~1.5 loads and 0.75 shuffles, against small_rows' two loads
// and one store (three memory operations; Zen 4 issues three a cycle). Path::Insert, and Path::Auto at T = 1.
#if defined(__SSE4_1__)
constexpr bool kHasInsert = true;
template <typename ColT>
inline void four_cols(const ColT* c, int64_t (&i)[4]) {
    if (sizeof(ColT) == 2) {
        uint64_t q;
        std::memcpy(&q, c, 8);
        for (int u = 0; u < 4; ++u) i[u] = static_cast<int16_t>(static_cast<uint16_t>(q >> (16 * u)));
    } else {
        for (int u = 0; u < 4; ++u) i[u] = c[u];
    }
}
template <bool UnitC, typename ColT>
inline __m128 four_x(const float* x, int64_t xs_c, const ColT* c) {  // x[c[0..3] * xs_c]
    int64_t i[4];
    four_cols(c, i);
    if (!UnitC)
        for (int u = 0; u < 4; ++u) i[u] *= xs_c;
    __m128 v = _mm_load_ss(x + i[0]);
    v = _mm_insert_ps(v, _mm_load_ss(x + i[1]), 0x10);
    v = _mm_insert_ps(v, _mm_load_ss(x + i[2]), 0x20);
    return _mm_insert_ps(v, _mm_load_ss(x + i[3]), 0x30);
}
template <bool UnitC, typename ColT>
VLS_NOINLINE void insert_rows(const float* __restrict x, int64_t xs_c, const int32_t* __restrict crow,
                              const ColT* __restrict col, const float* __restrict val, const float* __restrict bias,
                              int64_t r0, int64_t r1, float* __restrict y, int64_t ys_o, Act act) {
    for (int64_t o = r0; o < r1; ++o) {
        __m128 a[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
        int64_t k = crow[o];
        const int64_t end = crow[o + 1];
        for (; k + 16 <= end; k += 16)
            for (int u = 0; u < 4; ++u)
                a[u] = _mm_add_ps(a[u], _mm_mul_ps(_mm_loadu_ps(val + k + 4 * u),
                                                   four_x<UnitC, ColT>(x, xs_c, col + k + 4 * u)));
        for (; k + 4 <= end; k += 4)
            a[0] = _mm_add_ps(a[0], _mm_mul_ps(_mm_loadu_ps(val + k), four_x<UnitC, ColT>(x, xs_c, col + k)));
        const __m128 s4 = _mm_add_ps(_mm_add_ps(a[0], a[1]), _mm_add_ps(a[2], a[3]));
        alignas(16) float s[4];
        _mm_store_ps(s, s4);
        float v = (s[0] + s[1]) + (s[2] + s[3]) + (bias ? bias[o] : 0.0f);
        for (; k < end; ++k) v += val[k] * x[UnitC ? static_cast<int64_t>(col[k]) : static_cast<int64_t>(col[k]) * xs_c];
        y[o * ys_o] = act == Act::Gelu ? gelu_erf(v) : v;
    }
}
// All tokens, one per pass, rows in blocks of 64 spread with par.
template <typename ColT, typename Par>
void insert_tokens(const float* x, int64_t tokens, int64_t xs_t, int64_t xs_c, const int32_t* crow, const ColT* col,
                   const float* val, const float* bias, int64_t out_features, float* y, int64_t ys_t, int64_t ys_o,
                   Act act, const Par& par) {
    const int64_t nblk = (out_features + 63) / 64;
    par(nblk * tokens, [&](int64_t i) {
        const int64_t t = i / nblk, r0 = (i % nblk) * 64, r1 = std::min(out_features, r0 + 64);
        if (xs_c == 1)
            insert_rows<true, ColT>(x + t * xs_t, 1, crow, col, val, bias, r0, r1, y + t * ys_t, ys_o, act);
        else
            insert_rows<false, ColT>(x + t * xs_t, xs_c, crow, col, val, bias, r0, r1, y + t * ys_t, ys_o, act);
    });
}
#else
constexpr bool kHasInsert = false;
template <typename ColT, typename Par>
void insert_tokens(const float*, int64_t, int64_t, int64_t, const int32_t*, const ColT*, const float*, const float*,
                   int64_t, float*, int64_t, int64_t, Act, const Par&) {}
#endif

}  // namespace detail
}  // namespace vlsparse
