// vlsparse register-x kernel: Y = X W^T + bias for one or two tokens, W (out x in) in CSR by output row,
// x held in vector registers 64 columns at a time (AVX-512 F + BW only; detail::kHasXreg says whether).
//
// Part of spmm.h (included by it after its vector abstraction; not a standalone header). Runs for
// Path::Xreg (at every token count); Path::Auto does not pick it: on the 2-core Zen 4 it measured
// 0.49-0.68x the speed of small_rows at T = 1, about 23 cycles per (row, 64-column block) even when the
// block holds no nonzero, so it only pays off where rows are long and dense (README, "Kernel paths").
//
// Element (t, c) of X at x[t * xs_t + c * xs_c] (a strided x is first copied to a contiguous buffer),
// float32; output (t, o) at y[t * ys_t + o * ys_o]. Per token, per block of 64 output rows: the columns are
// walked in blocks of 64; x[c0 .. c0 + 64) is loaded into four zmm registers once per (column block, row
// block), and every row of the block takes its nonzeros in [c0, c0 + 64) (a per-row cursor into the sorted
// row, as the strips do) 32 at a time: one masked load of 32 int16 (or 2 x 16 int32) column indices,
// two compares give the lanes inside the block, the leading run of them is this step's nonzeros; x[c] for
// 16 lanes is two vpermt2ps (2 x 32 floats) + a blend on bit 5 of c - c0, i.e. register-to-register, no
// memory access per nonzero; one masked load of values and one masked FMA per 16 lanes into the row's
// 16-lane accumulator. Rows of any length and order are exact: a step takes only in-block lanes, masked-off
// lanes touch nothing, and nonzeros a cursor passed over (unsorted rows) are added by a scalar loop at the
// end. Why: on this Zen 4 the vgatherdps gather-dot kernel (spmm_gather.h) measured slower than scalar
// loads (benchmarks/spmm_table.py, backends cpu@gather vs cpu@legacy), and the scalar kernel needs two loads
// and a store per nonzero; here the per-nonzero work is about 1/16 of a permute pair and an FMA, plus per
// (row, column block) a fixed ~30 instructions with no data-dependent branch at 50-90% sparsity (a step
// covers 32 nonzeros, a 64-column block holds 19 on average at 70%). Source of the permute: the two-table
// lookup of VPERMT2PS (Intel 64 and IA-32 Architectures Software Developer's Manual, vol. 2, "VPERMT2PS").
#pragma once

#include <cstdint>
#include <cstring>

namespace vlsparse {
namespace detail {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool kHasXreg = true;
constexpr int64_t kXregCols = 64;  // columns of x per register block (four zmm)
constexpr int64_t kXregRows = 64;  // output rows per work item

struct XBlock {
    __m512 r[4];
};
// x[c0 .. c0 + 64) into registers, zero past in_features (masked loads: nothing read past x's end).
inline XBlock load_xblock(const float* x, int64_t c0, int64_t in_features) {
    XBlock b;
    for (int j = 0; j < 4; ++j) {
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, in_features - c0 - 16 * j));
        b.r[j] = _mm512_maskz_loadu_ps(V::mask(static_cast<int>(n)), x + c0 + 16 * j);
    }
    return b;
}
// x[c0 + rel] for 16 lanes, rel in [0, 64): vpermt2ps over r0:r1 and r2:r3, blend on bit 5 of rel.
inline __m512 xpick(const XBlock& b, __m512i rel) {
    const __m512 lo = _mm512_permutex2var_ps(b.r[0], rel, b.r[1]);
    const __m512 hi = _mm512_permutex2var_ps(b.r[2], rel, b.r[3]);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(rel, _mm512_set1_epi32(32)), lo, hi);
}
// 32 column indices from p (lanes >= avail read nothing, are 0) as two int32 vectors; returns the 32-bit mask
// of the available lanes with lo <= col <= hi.
inline uint32_t load_idx32(const int16_t* p, int64_t avail, int64_t lo, int64_t hi, __m512i& i0, __m512i& i1) {
    const __mmask32 m = avail >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << avail) - 1u);
    const __m512i v = _mm512_maskz_loadu_epi16(m, p);
    const __mmask32 in = _mm512_mask_cmpge_epi16_mask(m, v, _mm512_set1_epi16(static_cast<int16_t>(lo))) &
                         _mm512_cmple_epi16_mask(v, _mm512_set1_epi16(static_cast<int16_t>(std::min<int64_t>(hi, 32767))));
    i0 = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(v));
    i1 = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1));
    return static_cast<uint32_t>(in);
}
inline uint32_t load_idx32(const int32_t* p, int64_t avail, int64_t lo, int64_t hi, __m512i& i0, __m512i& i1) {
    const __mmask16 m0 = V::mask(static_cast<int>(std::min<int64_t>(16, avail)));
    const __mmask16 m1 = V::mask(static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, avail - 16))));
    i0 = _mm512_maskz_loadu_epi32(m0, p);
    i1 = _mm512_maskz_loadu_epi32(m1, p + 16);
    const __m512i l = _mm512_set1_epi32(static_cast<int32_t>(lo));
    const __m512i h = _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(hi, INT32_MAX)));
    const uint32_t in0 = _mm512_mask_cmpge_epi32_mask(m0, i0, l) & _mm512_cmple_epi32_mask(i0, h);
    const uint32_t in1 = _mm512_mask_cmpge_epi32_mask(m1, i1, l) & _mm512_cmple_epi32_mask(i1, h);
    return in0 | (in1 << 16);
}

// Rows [r0, r1) for one token of a contiguous x (in_features floats): y[o * ys_o] = act(W[o] . x + bias[o]).
template <typename ColT>
VLS_NOINLINE void xreg_rows(const float* __restrict x, int64_t in_features, const int32_t* __restrict crow,
                            const ColT* __restrict col, const float* __restrict val, const float* __restrict bias,
                            int64_t r0, int64_t r1, float* __restrict y, int64_t ys_o, Act act) {
    __m512 acc[kXregRows];
    int64_t cur[kXregRows];
    const int64_t nr = r1 - r0;
    for (int64_t r = 0; r < nr; ++r) {
        acc[r] = _mm512_setzero_ps();
        cur[r] = crow[r0 + r];
    }
    for (int64_t c0 = 0; c0 < in_features; c0 += kXregCols) {
        const XBlock b = load_xblock(x, c0, in_features);
        const int64_t hi = c0 + kXregCols - 1;
        const __m512i base = _mm512_set1_epi32(static_cast<int32_t>(c0));
        for (int64_t r = 0; r < nr; ++r) {
            int64_t k = cur[r];
            const int64_t end = crow[r0 + r + 1];
            uint32_t n = 32;
            while (n == 32 && k < end) {  // one step at 50-90% sparsity: a 64-column block rarely holds 32
                __m512i i0, i1;
                const uint32_t in = load_idx32(col + k, end - k, c0, hi, i0, i1);
                n = ~in ? static_cast<uint32_t>(__builtin_ctz(~in)) : 32u;  // leading in-block lanes
                const uint32_t mm = n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1u;
                const __mmask16 m0 = static_cast<__mmask16>(mm), m1 = static_cast<__mmask16>(mm >> 16);
                const __m512 w0 = _mm512_maskz_loadu_ps(m0, val + k), w1 = _mm512_maskz_loadu_ps(m1, val + k + 16);
                acc[r] = _mm512_mask3_fmadd_ps(w0, xpick(b, _mm512_sub_epi32(i0, base)), acc[r], m0);
                acc[r] = _mm512_mask3_fmadd_ps(w1, xpick(b, _mm512_sub_epi32(i1, base)), acc[r], m1);
                k += n;
            }
            cur[r] = k;
        }
    }
    for (int64_t r = 0; r < nr; ++r) {
        float s = hsum(acc[r]) + (bias ? bias[r0 + r] : 0.0f);
        for (int64_t k = cur[r]; k < crow[r0 + r + 1]; ++k) s += val[k] * x[col[k]];  // unsorted leftovers
        y[(r0 + r) * ys_o] = act == Act::Gelu ? gelu_erf(s) : s;
    }
}

// All tokens, one at a time, rows in blocks of kXregRows spread with par.
template <typename ColT, typename Par>
void xreg_tokens(const float* x, int64_t tokens, int64_t in_features, int64_t xs_t, int64_t xs_c, const int32_t* crow,
                 const ColT* col, const float* val, const float* bias, int64_t out_features, float* y, int64_t ys_t,
                 int64_t ys_o, Act act, const Par& par) {
    const int64_t nblk = (out_features + kXregRows - 1) / kXregRows;
    par(nblk * tokens, [&](int64_t i) {
        const int64_t t = i / nblk, r0 = (i % nblk) * kXregRows, r1 = std::min(out_features, r0 + kXregRows);
        const float* xt = x + t * xs_t;
        if (xs_c != 1) {  // strided (feature-major) x: a contiguous copy
            static thread_local Scratch buf;
            float* xc = buf.get(static_cast<size_t>(in_features));
            for (int64_t c = 0; c < in_features; ++c) xc[c] = xt[c * xs_c];
            xt = xc;
        }
        xreg_rows<ColT>(xt, in_features, crow, col, val, bias, r0, r1, y + t * ys_t, ys_o, act);
    });
}
#else
constexpr bool kHasXreg = false;
template <typename ColT, typename Par>
void xreg_tokens(const float*, int64_t, int64_t, int64_t, int64_t, const int32_t*, const ColT*, const float*,
                 const float*, int64_t, float*, int64_t, int64_t, Act, const Par&) {}
#endif

}  // namespace detail
}  // namespace vlsparse
