// vlsparse int8 sparse x dense kernel: Y = act(dequant(Xq Wq^T) + bias), W (out x in) pruned, stored as
// 1x4 blocks (4 consecutive inputs of one output row kept or pruned together; an unstructured mask is
// stored as the 1x4 blocks it touches, the pruned weights inside them zero).
//
// Quantisation (what onnxruntime's dynamic quantisation does, per token instead of per tensor):
//   weights  symmetric int8, one fp32 scale per output row: w ~ sw[o] * wq, wq in [-127, 127] (done in Python)
//   inputs   asymmetric uint8 per token, the ONNX DynamicQuantizeLinear formula applied to each row of X:
//              lo = min(0, min_k x), hi = max(0, max_k x), sx = (hi - lo) / 255 (1 when hi == lo),
//              zp = clamp(round(-lo / sx), 0, 255), xq = clamp(round(x / sx) + zp, 0, 255),
//            round half to even, float32 arithmetic (x / sx a true division).
//   acc[t, o] = sum_k (xq[t, k] - zp[t]) * wq[o, k]   (int32, exact: acc(xq.wq) - zp[t] * wsum[o])
//   y[t, o]   = act(float(acc) * (sx[t] * sw[o]) + bias[o])   (fp32)
// uint8 x int8 is what VNNI's vpdpbusd multiplies: 4 byte products summed into an int32 lane.
//
// Data layout: the quantised X is packed block-major, xq[kb][t][j] = xq(t, 4 kb + j) (Tp = T rounded up
// to 16, padded tokens and inputs hold zeros), so that one 64-byte vector holds one block of 16 tokens
// and a block's 4 weights, broadcast, multiply it with one vpdpbusd.
//
// ISA paths, chosen at run time (isa = -1: the best the CPU has, or one forced for tests):
//   2 "avx512vnni"  vpdpbusd on 16 tokens per vector
//   1 "avx2"        exact emulation: bytes widened to int16 pairs and vpmaddwd (no vpmaddubsw, which saturates)
//   0 "scalar"      plain C++
// Every path is compiled with its own target attribute (GCC/Clang), so one build runs on any x86-64 CPU.
// Threads: the caller's parallel-for policy (spmm.h: OmpFor, OpenMP, by default; the onnxruntime op passes
// onnxruntime's intra-op pool) over groups of 16 tokens (quantisation), then over (token strip of up to 12 groups,
// block of 64 output rows) units, like spmm.h; inputs walked in column blocks whose slice of the packed xq stays
// close to the core (per-row cursors into the sorted blocks), as spmm.h does.
//
// Few tokens (T <= kGemvTokens, AVX512-VNNI): a 16-token group would leave 15 of 16 lanes idle at T = 1 and read
// one 64-byte line of the packed xq per block, so instead each token is quantised into a plain row (one int32 per
// 4 inputs, L1-resident) and each row's blocks are taken 16 at a time: their block columns loaded as one vector,
// the 16 activation words fetched by vpgatherdd, the 16 blocks' weights (64 contiguous bytes) multiplied with
// them by one vpdpbusd; a masked step for the last 1-15 blocks; one horizontal sum per (row, token). The same
// integers as the group path (exact), then the same epilogue.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "spmm.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VLS_I8_X86 1
#define VLS_I8_TARGET(t) __attribute__((target(t)))
#else
#define VLS_I8_X86 0
#define VLS_I8_TARGET(t)
#endif

namespace vlsparse {
namespace int8 {

enum Isa : int { kScalar = 0, kAvx2 = 1, kVnni512 = 2 };
constexpr int kGroup = 16;  // tokens per group (one AVX-512 vector of int32)
constexpr int kMaxGroups = 12;  // groups per token strip (12 accumulators of the 32 zmm registers)
constexpr int64_t kRowBlock = 64;
// bytes of packed xq per column block: more than Zen 4's 32 KiB L1 on purpose (48 KiB measured 7-15% faster than 24
// KiB with 12-group strips, at 1 thread on the UNITER-base shapes; the part not in L1 comes from L2)
constexpr int64_t kL1Bytes = 48 * 1024;
// tokens <= this on the AVX512-VNNI path: the gather-dot path (gemv_tokens below) instead of 16-token groups (at
// 1 thread on the UNITER-base shapes, 70% 1x4 blocks: 2.0-2.6x the group path at T = 1, 1.2x at T = 2, slower at 4)
constexpr int64_t kGemvTokens = 2;

inline const char* isa_name(int isa) {
    return isa == kVnni512 ? "avx512vnni" : isa == kAvx2 ? "avx2" : "scalar";
}

inline bool isa_supported(int isa) {
#if VLS_I8_X86
    if (isa == kVnni512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (isa == kAvx2) return __builtin_cpu_supports("avx2");
#endif
    return isa == kScalar;
}

inline int best_isa() {
    static const int best = isa_supported(kVnni512) ? kVnni512 : isa_supported(kAvx2) ? kAvx2 : kScalar;
    return best;
}

inline int64_t padded_tokens(int64_t tokens) { return (tokens + kGroup - 1) / kGroup * kGroup; }

// Round half to even for |v| < 2^22 (adding and removing 1.5 * 2^23 rounds at the units in round-to-nearest
// mode): what std::nearbyint gives, but in a form the compiler vectorises. |x / sx| <= 255 here.
inline float round_even(float v) {
    const float magic = 12582912.0f;
    return (v + magic) - magic;
}

// One token's quantisation (formula above): returns its scale and zero point, writes its bytes into q (in bytes,
// then zeros up to a whole number of 16-byte chunks: q holds at least that many). Plain C++ that the compiler
// vectorises (exact operations, so the numbers are the same on every path); all sizes are parameters so that
// the byte stores cannot alias them.
inline void quantize_token(const float* __restrict row, int64_t in, uint8_t* __restrict q, float* s_out,
                           int32_t* z_out) {
    constexpr int L = 16;
    float mn[L] = {}, mx[L] = {};  // start at 0: lo = min(0, min x), hi = max(0, max x)
    int64_t k = 0;
    for (; k + L <= in; k += L)
        for (int j = 0; j < L; ++j) {
            const float v = row[k + j];
            mn[j] = v < mn[j] ? v : mn[j];
            mx[j] = v > mx[j] ? v : mx[j];
        }
    for (; k < in; ++k) {
        mn[0] = row[k] < mn[0] ? row[k] : mn[0];
        mx[0] = row[k] > mx[0] ? row[k] : mx[0];
    }
    float lo = 0.0f, hi = 0.0f;
    for (int j = 0; j < L; ++j) {
        lo = std::min(lo, mn[j]);
        hi = std::max(hi, mx[j]);
    }
    float s = (hi - lo) / 255.0f;
    if (!(s > 0.0f)) s = 1.0f;
    const float z = std::min(255.0f, std::max(0.0f, round_even(-lo / s)));
    *s_out = s;
    *z_out = static_cast<int32_t>(z);
    for (int64_t i = 0; i < in; ++i) {
        float v = round_even(row[i] / s) + z;
        v = v < 0.0f ? 0.0f : v;
        v = v > 255.0f ? 255.0f : v;
        q[i] = static_cast<uint8_t>(static_cast<int32_t>(v));
    }
    for (int64_t i = in; i < (in + 15) / 16 * 16; ++i) q[i] = 0;
}

#if VLS_I8_X86
// quantize_token with AVX-512 (the same operations: min/max, true division, round half to even, clamp).
VLS_I8_TARGET("avx512f,avx512bw")
inline void quantize_token_avx512(const float* __restrict row, int64_t in, uint8_t* __restrict q, float* s_out,
                                  int32_t* z_out) {
    __m512 mn = _mm512_setzero_ps(), mx = _mm512_setzero_ps();  // lo = min(0, min x), hi = max(0, max x)
    for (int64_t k = 0; k < in; k += 16) {
        const __mmask16 m = in - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in - k)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(m, row + k);  // zeros past the end: they do not move lo or hi
        mn = _mm512_min_ps(mn, v);
        mx = _mm512_max_ps(mx, v);
    }
    const float lo = _mm512_reduce_min_ps(mn), hi = _mm512_reduce_max_ps(mx);
    float s = (hi - lo) / 255.0f;
    if (!(s > 0.0f)) s = 1.0f;
    const float z = std::min(255.0f, std::max(0.0f, round_even(-lo / s)));
    *s_out = s;
    *z_out = static_cast<int32_t>(z);
    const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z), v0 = _mm512_setzero_ps(), v255 = _mm512_set1_ps(255.0f);
    for (int64_t k = 0; k < in; k += 16) {
        const __mmask16 m = in - k >= 16 ? __mmask16(0xFFFF) : in > k ? __mmask16((1u << (in - k)) - 1u) : __mmask16(0);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, row + k), vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), v0), v255);
        const __m128i b = _mm512_cvtepi32_epi8(_mm512_maskz_mov_epi32(m, _mm512_cvtps_epi32(v)));  // 0 past the end
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), b);
    }
}
#endif

// Per-token quantisation of x (T x in, row stride ldx) into the packed xq (KB x Tp x 4 bytes, KB = ceil(in / 4);
// padded tokens and inputs zero), sx (T) and zp (T). AVX-512 when the CPU has it (the same numbers as the plain
// C++). Work items of 16 tokens: each token is quantised into a row of a small buffer, then every block row of xq
// gets the group's 64 bytes in one piece (one cache line written whole, not 16 scattered 4-byte writes).
// par: the parallel-for policy over the groups (spmm.h).
template <typename Par = OmpFor>
inline void quantize_tokens(const float* x, int64_t tokens, int64_t in, int64_t ldx, uint8_t* xq, int64_t tp,
                            float* sx, int32_t* zp, int isa = -1, const Par& par = Par()) {
    const int64_t kb_n = (in + 3) / 4, rs = (in + 15) / 16 * 16, ld = tp * 4;  // rs: a token's row in the buffer
    if (isa < 0) isa = best_isa();
    par(tp / kGroup, [&](int64_t g) {
        static thread_local vlsparse::detail::Scratch buf;
        uint8_t* q = reinterpret_cast<uint8_t*>(buf.get(static_cast<size_t>(kGroup * rs / 4)));
        const int64_t t0 = g * kGroup, n = std::min<int64_t>(kGroup, tokens - t0);
        for (int64_t i = 0; i < n; ++i) {
            const int64_t t = t0 + i;
#if VLS_I8_X86
            if (isa == kVnni512) {
                quantize_token_avx512(x + t * ldx, in, q + i * rs, sx + t, zp + t);
                continue;
            }
#endif
            quantize_token(x + t * ldx, in, q + i * rs, sx + t, zp + t);
        }
        if (n < kGroup) std::memset(q + n * rs, 0, static_cast<size_t>((kGroup - n) * rs));  // padded tokens
        for (int64_t kb = 0; kb < kb_n; ++kb) {
            uint8_t* d = xq + kb * ld + t0 * 4;
            for (int i = 0; i < kGroup; ++i) std::memcpy(d + 4 * i, q + i * rs + 4 * kb, 4);
        }
    });
}

namespace detail8 {

// acc[g * 16 + i] (int32) += sum over the nb blocks b of dot4(xq[bcol[b]][token g*16+i], wq[b]), for the NG
// groups of 16 tokens starting at xs (one block row of xq is ld bytes).
template <typename ColT>
inline void row_scalar(const uint8_t* xs, int64_t ld, const ColT* bcol, const int8_t* wq, int64_t nb, int ng,
                       int32_t* acc) {
    const int n = ng * kGroup;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* xb = xs + static_cast<int64_t>(bcol[b]) * ld;
        const int8_t* w = wq + 4 * b;
        for (int i = 0; i < n; ++i)
            acc[i] += xb[4 * i] * w[0] + xb[4 * i + 1] * w[1] + xb[4 * i + 2] * w[2] + xb[4 * i + 3] * w[3];
    }
}

#if VLS_I8_X86
template <int NG>
VLS_I8_TARGET("avx512f,avx512bw,avx512vnni")
inline void vnni_step(__m512i* a, const uint8_t* xb, const int8_t* wq) {
    int32_t w4;
    std::memcpy(&w4, wq, 4);
    const __m512i w = _mm512_set1_epi32(w4);
    for (int g = 0; g < NG; ++g)
        a[g] = _mm512_dpbusd_epi32(a[g], _mm512_loadu_si512(reinterpret_cast<const void*>(xb + 64 * g)), w);
}

// U independent accumulator sets (blocks b, b+1, ... in turn) hide vpdpbusd's latency when NG is small.
template <int NG, typename ColT>
VLS_I8_TARGET("avx512f,avx512bw,avx512vnni")
void row_vnni(const uint8_t* xs, int64_t ld, const ColT* bcol, const int8_t* wq, int64_t nb, int32_t* acc) {
    constexpr int U = NG >= 4 ? 1 : NG >= 2 ? 2 : 4;
    __m512i a[U][NG];
    for (int u = 0; u < U; ++u)
        for (int g = 0; g < NG; ++g) a[u][g] = _mm512_setzero_si512();
    int64_t b = 0;
    for (; b + U <= nb; b += U)
        for (int u = 0; u < U; ++u) vnni_step<NG>(a[u], xs + static_cast<int64_t>(bcol[b + u]) * ld, wq + 4 * (b + u));
    for (; b < nb; ++b) vnni_step<NG>(a[0], xs + static_cast<int64_t>(bcol[b]) * ld, wq + 4 * b);
    for (int g = 0; g < NG; ++g) {
        __m512i s = _mm512_loadu_si512(reinterpret_cast<const void*>(acc + 16 * g));
        for (int u = 0; u < U; ++u) s = _mm512_add_epi32(s, a[u][g]);
        _mm512_storeu_si512(reinterpret_cast<void*>(acc + 16 * g), s);
    }
}

// AVX2 has no u8 x s8 -> int32 dot product without saturation (vpmaddubsw saturates at int16), so the bytes
// of each 4-byte lane are split into two int16 pairs (x0, x2) and (x1, x3) and multiplied with vpmaddwd.
template <int NG, typename ColT>
VLS_I8_TARGET("avx2")
void row_avx2(const uint8_t* xs, int64_t ld, const ColT* bcol, const int8_t* wq, int64_t nb, int32_t* acc) {
    __m256i a[2 * NG];
    for (int g = 0; g < 2 * NG; ++g) a[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 8 * g));
    const __m256i low = _mm256_set1_epi16(0x00FF);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* xb = xs + static_cast<int64_t>(bcol[b]) * ld;
        const int8_t* w = wq + 4 * b;
        const __m256i w02 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(w[0]) |
                                                                   (static_cast<uint32_t>(static_cast<uint16_t>(w[2])) << 16)));
        const __m256i w13 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint16_t>(w[1]) |
                                                                   (static_cast<uint32_t>(static_cast<uint16_t>(w[3])) << 16)));
        for (int g = 0; g < 2 * NG; ++g) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32 * g));
            const __m256i p = _mm256_madd_epi16(_mm256_and_si256(xv, low), w02);
            a[g] = _mm256_add_epi32(a[g], _mm256_add_epi32(p, _mm256_madd_epi16(_mm256_srli_epi16(xv, 8), w13)));
        }
    }
    for (int g = 0; g < 2 * NG; ++g) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 8 * g), a[g]);
}
#endif

template <typename ColT>
inline void row_dispatch(int isa, const uint8_t* xs, int64_t ld, const ColT* bcol, const int8_t* wq, int64_t nb,
                         int ng, int32_t* acc) {
#if VLS_I8_X86
    if (isa == kVnni512) {
        switch (ng) {
            case 1: row_vnni<1, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 2: row_vnni<2, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 3: row_vnni<3, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 4: row_vnni<4, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 5: row_vnni<5, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 6: row_vnni<6, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 7: row_vnni<7, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 8: row_vnni<8, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 9: row_vnni<9, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 10: row_vnni<10, ColT>(xs, ld, bcol, wq, nb, acc); return;
            case 11: row_vnni<11, ColT>(xs, ld, bcol, wq, nb, acc); return;
            default: row_vnni<12, ColT>(xs, ld, bcol, wq, nb, acc); return;
        }
    }
    if (isa == kAvx2) {
        // 16 ymm registers: at most 4 groups (8 accumulators) at a time
        for (int g0 = 0; g0 < ng; g0 += 4) {
            const int n = std::min(4, ng - g0);
            const uint8_t* x0 = xs + 64 * g0;
            int32_t* a0 = acc + kGroup * g0;
            if (n == 4) row_avx2<4, ColT>(x0, ld, bcol, wq, nb, a0);
            else if (n == 3) row_avx2<3, ColT>(x0, ld, bcol, wq, nb, a0);
            else if (n == 2) row_avx2<2, ColT>(x0, ld, bcol, wq, nb, a0);
            else row_avx2<1, ColT>(x0, ld, bcol, wq, nb, a0);
        }
        return;
    }
#else
    (void)isa;
#endif
    row_scalar<ColT>(xs, ld, bcol, wq, nb, ng, acc);
}

}  // namespace detail8

#if VLS_I8_X86
namespace detail8 {
// Rows [r0, r1) for TT tokens: acc[t * out + o] = sum over the row's blocks of dot4(xg[t][bcol], wq block), xg the
// tokens' quantised rows as int32 words (stride kw words), exact int32.
template <int TT, typename ColT>
VLS_I8_TARGET("avx512f,avx512bw,avx512vl,avx512vnni")
void gemv_rows(const int32_t* xg, int64_t kw, const int32_t* crow, const ColT* bcol, const int8_t* wq, int64_t r0,
               int64_t r1, int64_t out, int32_t* acc) {
    for (int64_t o = r0; o < r1; ++o) {
        __m512i a[TT];
        for (int t = 0; t < TT; ++t) a[t] = _mm512_setzero_si512();
        const int64_t end = crow[o + 1];
        for (int64_t k = crow[o]; k < end; k += 16) {
            const __mmask16 m = end - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (end - k)) - 1u);
            __m512i idx;
            if (sizeof(ColT) == 2)
                idx = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, bcol + k));
            else
                idx = _mm512_maskz_loadu_epi32(m, bcol + k);
            const __m512i w = _mm512_maskz_loadu_epi32(m, wq + 4 * k);  // 16 blocks of 4 int8 weights
            for (int t = 0; t < TT; ++t) {
                const __m512i xv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, xg + t * kw, 4);
                a[t] = _mm512_dpbusd_epi32(a[t], xv, w);
            }
        }
        for (int t = 0; t < TT; ++t) acc[t * out + o] = _mm512_reduce_add_epi32(a[t]);
    }
}
}  // namespace detail8
#endif

// The few-token path (header comment), AVX512-VNNI only: same arguments and results as spmm_int8.
template <typename ColT, typename Par>
void gemv_tokens(const float* x, int64_t tokens, int64_t in, const int32_t* crow, const ColT* bcol, const int8_t* wq,
                 const float* sw, const int32_t* wsum, const float* bias, int64_t out, float* y, int32_t* acc_out,
                 Act act, const Par& par) {
#if VLS_I8_X86
    const int64_t rs = (in + 15) / 16 * 16;  // bytes of one token's row (quantize_token zero-fills up to it)
    static thread_local vlsparse::detail::Scratch qbuf, abuf;
    float* qf = qbuf.get(static_cast<size_t>(tokens * rs / 4 + 2 * tokens));
    uint8_t* q = reinterpret_cast<uint8_t*>(qf);
    float* sx = qf + tokens * rs / 4;
    int32_t* zp = reinterpret_cast<int32_t*>(sx + tokens);
    for (int64_t t = 0; t < tokens; ++t) quantize_token_avx512(x + t * in, in, q + t * rs, sx + t, zp + t);
    int32_t* acc = acc_out ? acc_out : reinterpret_cast<int32_t*>(abuf.get(static_cast<size_t>(tokens * out)));
    using Fn = void (*)(const int32_t*, int64_t, const int32_t*, const ColT*, const int8_t*, int64_t, int64_t, int64_t,
                        int32_t*);
    static constexpr Fn kFns[kGemvTokens] = {&detail8::gemv_rows<1, ColT>, &detail8::gemv_rows<2, ColT>};
    const int64_t nblk = (out + kRowBlock - 1) / kRowBlock;
    par(nblk, [&](int64_t b) {
        const int64_t r0 = b * kRowBlock, r1 = std::min(out, r0 + kRowBlock);
        kFns[tokens - 1](reinterpret_cast<const int32_t*>(q), rs / 4, crow, bcol, wq, r0, r1, out, acc);
        for (int64_t t = 0; t < tokens; ++t) {
            int32_t* a = acc + t * out;
            for (int64_t o = r0; o < r1; ++o) a[o] -= zp[t] * wsum[o];
            if (acc_out != nullptr) continue;
            float* yt = y + t * out;
            for (int64_t o = r0; o < r1; ++o) yt[o] = static_cast<float>(a[o]) * (sx[t] * sw[o]) + (bias ? bias[o] : 0.0f);
            if (act == Act::Gelu) vlsparse::detail::gelu_erf_inplace(yt + r0, r1 - r0);
        }
    });
#else
    (void)x, (void)tokens, (void)in, (void)crow, (void)bcol, (void)wq, (void)sw, (void)wsum, (void)bias, (void)out;
    (void)y, (void)acc_out, (void)act, (void)par;
#endif
}

// Y = act(dequant(Xq Wq^T) + bias) (row-major T x out fp32), or, with acc_out != nullptr, the exact
// integer accumulations acc[t, o] = sum_k (xq - zp[t]) * wq (int32, T x out) and no y.
// x: T x in fp32 row-major; crow: out+1 int32 over blocks; bcol: nblocks block columns (input // 4);
// wq: nblocks x 4 int8; sw: out fp32; wsum: out int32 (sum of the row's wq); bias: out fp32 or nullptr.
// isa: -1 best available, else kScalar / kAvx2 / kVnni512 (must be supported). par: the parallel-for policy
// (spmm.h; OmpFor by default, the onnxruntime op passes one on onnxruntime's intra-op pool).
template <typename ColT, typename Par = OmpFor>
void spmm_int8(const float* x, int64_t tokens, int64_t in, const int32_t* crow, const ColT* bcol, const int8_t* wq,
               const float* sw, const int32_t* wsum, const float* bias, int64_t out, float* y, int32_t* acc_out,
               Act act, int isa, const Par& par = Par()) {
    if (tokens <= 0 || out <= 0) return;
    if (isa < 0) isa = best_isa();
    if (isa == kVnni512 && tokens <= kGemvTokens) {
        gemv_tokens<ColT>(x, tokens, in, crow, bcol, wq, sw, wsum, bias, out, y, acc_out, act, par);
        return;
    }
    const int64_t tp = padded_tokens(tokens), kb_n = (in + 3) / 4, ld = tp * 4;
    static thread_local vlsparse::detail::Scratch xbuf, sbuf;
    uint8_t* xq = reinterpret_cast<uint8_t*>(xbuf.get(static_cast<size_t>(kb_n * tp + tp)));
    float* sx = sbuf.get(static_cast<size_t>(2 * tp));
    int32_t* zp = reinterpret_cast<int32_t*>(sx + tp);
    quantize_tokens(x, tokens, in, in, xq, tp, sx, zp, isa, par);
    const int64_t groups = tp / kGroup, n_strips = (groups + kMaxGroups - 1) / kMaxGroups;
    const int64_t row_blocks = (out + kRowBlock - 1) / kRowBlock;
    par(n_strips * row_blocks, [&](int64_t unit) {
        const int64_t s = unit / row_blocks, r0 = (unit % row_blocks) * kRowBlock;
        const int64_t g0 = s * groups / n_strips, g1 = (s + 1) * groups / n_strips;  // balanced strips
        const int ng = static_cast<int>(g1 - g0);
        const int64_t t0 = g0 * kGroup, tn = std::min(tokens, g1 * kGroup) - t0, width = ng * kGroup;
        const int64_t nr = std::min(kRowBlock, out - r0);
        static thread_local vlsparse::detail::Scratch tile_buf, acc_buf;
        float* tile = tile_buf.get(static_cast<size_t>(kRowBlock * kMaxGroups * kGroup));
        int32_t* acc = reinterpret_cast<int32_t*>(acc_buf.get(static_cast<size_t>(kRowBlock * kMaxGroups * kGroup)));
        std::memset(acc, 0, static_cast<size_t>(nr * width) * sizeof(int32_t));
        // Walk the inputs in column blocks whose part of xq (cb blocks x ng groups x 64 bytes) stays in L1, with
        // a cursor per row into its (sorted) blocks.
        const int64_t cb = std::max<int64_t>(16, kL1Bytes / (64 * ng));
        int64_t cur[kRowBlock];
        for (int64_t r = 0; r < nr; ++r) cur[r] = crow[r0 + r];
        for (int64_t c0 = 0; c0 < kb_n; c0 += cb) {
            const int64_t lim = c0 + cb;
            for (int64_t r = 0; r < nr; ++r) {
                int64_t e = cur[r];
                const int64_t end = crow[r0 + r + 1];
                while (e < end && bcol[e] < lim) ++e;
                if (e > cur[r])
                    detail8::row_dispatch<ColT>(isa, xq + t0 * 4, ld, bcol + cur[r], wq + 4 * cur[r], e - cur[r], ng,
                                                acc + r * width);
                cur[r] = e;
            }
        }
        for (int64_t r = 0; r < nr; ++r) {
            const int64_t o = r0 + r;
            int32_t* a = acc + r * width;
            for (int64_t i = 0; i < tn; ++i) a[i] -= zp[t0 + i] * wsum[o];
            if (acc_out != nullptr) {
                for (int64_t i = 0; i < tn; ++i) acc_out[(t0 + i) * out + o] = a[i];
                continue;
            }
            const float b = bias ? bias[o] : 0.0f;
            float* trow = tile + r * width;
            for (int64_t i = 0; i < tn; ++i) trow[i] = static_cast<float>(a[i]) * (sx[t0 + i] * sw[o]) + b;
            if (act == Act::Gelu) vlsparse::detail::gelu_erf_inplace(trow, tn);
        }
        if (acc_out == nullptr)
            vlsparse::detail::tile_to_rowmajor(tile, width, nr, tn, y + t0 * out + r0, out);
    });
}

}  // namespace int8
}  // namespace vlsparse
