// vlsparse CPU sparse x dense kernels: Y = X W^T + bias with W (out x in) in CSR by output row.
//
// Pure C++17 + OpenMP (no torch / onnxruntime includes): shared by the torch extension
// (spmm_torch.cpp) and the onnxruntime custom-op library (ort_sparse_linear.cc).
//
// Entry points (namespace vlsparse, ColT = int16_t or int32_t):
//   spmm_f32     row-major X (tokens x in) -> row-major Y (tokens x out). The main entry.
//   spmm_f32_fm  feature-major X^T (in x ldx) -> feature-major Y^T (out x ldy): lets a caller keep
//                activations feature-major between consecutive sparse layers (no transposes).
//   spmm_f32_fm_rm  feature-major X^T in, row-major Y out: the last layer of a feature-major chain.
//   spmm_f32_rm_fm  row-major X in, feature-major Y^T out: the first layer of a chain.
//   spmv_f32     one token: y (out) = W x + bias.
// Every entry takes an epilogue (Act: none or GELU), a parallel-for policy (OmpFor by default) and a Path
// (Auto by default: which inner kernel runs, see enum class Path; Legacy keeps the kernel as it was before
// the gather-dot path so that benchmarks can time both).
//   simd_name()  "avx512" | "avx2" | "scalar": the vector path compiled in.
//   path_name(path, tokens)  "gather" | "small_rows" | "strips": the inner kernel a path runs.
//
// CSR contract: crow_indices non-decreasing with crow[0] = 0, column indices in [0, in). Columns
// sorted within a row are fastest (the cache blocking assumes it) but any order gives the right
// result. Duplicated columns are summed.
//
// Vector code is chosen at compile time: AVX-512 (__AVX512F__), AVX2 (+FMA), else scalar.
// Threads: with the default policy (OmpFor) every entry opens OpenMP parallel regions (one per phase:
// transpose, strips) with the caller's omp thread count (omp_get_max_threads()); link the same OpenMP
// runtime as the host (torch's libgomp) so that torch.set_num_threads applies. The onnxruntime op
// passes a policy on onnxruntime's intra-op pool instead.
//
// The multi-token kernel: X is transposed to feature-major and padded to a multiple of the
// vector width W (16 floats on AVX-512). Tokens are cut into strips of NV <= Tuning::max_vectors (<= 12)
// vectors, plus a half vector at the end when T mod W is 1..W/2 (T = 40 costs 2.5 vectors). Output rows
// are scheduled in blocks of 64 (dynamic). For a row block, the strip's accumulators live in a
// small tile (64 rows x strip width); the columns of W are walked in blocks of C (C * strip width
// * 4 bytes of X^T ~ 44 KiB, about L1) with a per-row cursor into the (sorted) CSR row, so the
// part of X^T in use stays close to the core (20-25% faster than streaming all of it from L2).
// Per nonzero w at column c: broadcast w, FMA the NV vectors of X^T[c, strip] into register
// accumulators (unrolled by two, two accumulator sets). The row-major entry transposes X and the
// finished tile with 16x16 register transposes, writing straight into Y (Y^T never exists).
// One token uses the insert-dot kernel of spmm_gather.h (x[c] by scalar loads placed into xmm lanes by
// vinsertps, four FMA chains), two tokens small_rows below (values in vectors, x[c] by scalar loads into a
// buffer), both without transposes. Two more T = 1 kernels are selectable (Path): the vgatherdps gather-dot
// (spmm_gather.h) and the register-x kernel (spmm_xreg.h); on the 2-core Zen 4 both measured slower than
// small_rows (README, "Kernel paths"), so Path::Auto does not pick them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// GCC 12 reports its own _mm512_undefined_ps() inside the intrinsic headers as uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace vlsparse {

// Epilogue applied to W x + bias before it is stored: nothing, or GELU (the exact, erf form that
// torch.nn.functional.gelu and BERT's "gelu" compute; here with a rational erf approximation whose
// error is below 1e-6 absolute).
enum class Act : int { None = 0, Gelu = 1 };

namespace detail {

// erf(x) for float: x * P(x^2) / Q(x^2) on [-4, 4] (odd / even polynomials of degree 13 / 8;
// the form and coefficients of Eigen's generic_fast_erf_float), +-1 beyond. Branch-free so that
// loops over it vectorize.
inline float erf_approx(float a) {
    const float x = std::min(4.0f, std::max(-4.0f, a));
    const float x2 = x * x;
    float p = x2 * -2.72614225801306e-10f + 2.77068142495902e-08f;
    p = x2 * p + -2.10102402082508e-06f;
    p = x2 * p + -5.69250639462346e-05f;
    p = x2 * p + -7.34990630326855e-04f;
    p = x2 * p + -2.95459980854025e-03f;
    p = x2 * p + -1.60960333262415e-02f;
    p = x * p;
    float q = x2 * -1.45660718464996e-05f + -2.13374055278905e-04f;
    q = x2 * q + -1.68282697438203e-03f;
    q = x2 * q + -7.37332916720468e-03f;
    q = x2 * q + -1.42647390514189e-02f;
    return p / q;
}
inline float gelu_erf(float v) { return 0.5f * v * (1.0f + erf_approx(v * 0.70710678118654752f)); }
inline void gelu_erf_inplace(float* __restrict p, int64_t n) {
    for (int64_t i = 0; i < n; ++i) p[i] = gelu_erf(p[i]);
}

}  // namespace detail

// Tunables. The member defaults are the kernel's as at commit 403de79 (Path::Legacy); tuning() (the other
// paths) changes four, measured on the 2-core AMD EPYC Zen 4 (README, "Kernel paths"); benchmarks may
// change them (the torch extension's set_tuning).
struct Tuning {
    int64_t row_block = 64;               // output rows per scheduling unit (<= kMaxRowBlock)
    int64_t l1_block_bytes = 44 * 1024;   // bytes of X^T per column block (C * NV * W * 4)
    int64_t min_block_cols = 32;          // lower bound on C
    int64_t l2_strip_bytes = 1024 * 1024; // a token strip's X^T (in * NV * W * 4) aims below this
    int64_t small_tokens = 2;             // tokens <= this: the small-token kernel, no transposes
    int64_t max_vectors = 8;              // token vectors per strip, held in registers per row (<= kMaxNV) ...
    int64_t wide_min_in = 0;              // ... when in_features >= this; below, at most 8
    int64_t insert_tokens = 0;            // Path::Auto: tokens <= this: the insert-dot kernel (spmm_gather.h)
};
// The tunables of every path but Legacy: one token by the insert-dot kernel (1.3-1.4x small_rows at T = 1),
// and, for in_features >= 2048, strips of up to 12 vectors (192 tokens) per pass over a row with no L2 cap
// below 8 MiB of X^T, so that T = 200 at in = 3072 is one strip of 12.5 vectors, not three of 4-4.5 (W,
// 4.2 MB at 768x3072 and 70%, read from L3 once instead of three times: 1.07-1.30x at T = 129 and 200).
// At in = 768 W fits L2 and 12-vector strips measured 0.94-0.96x (their column blocks get shorter), so
// there strips stay at 8 vectors.
inline Tuning& tuning() {
    static Tuning t = [] {
        Tuning u;
        u.insert_tokens = 1;
        u.max_vectors = 12;
        u.wide_min_in = 2048;
        u.l2_strip_bytes = int64_t{8} << 20;
        return u;
    }();
    return t;
}
// Path::Legacy's tunables: those of the kernel as it was at commit 403de79 (no insert-dot kernel, strips of
// at most 8 vectors under a 1 MiB L2 cap), kept so that benchmarks time old and new in one process.
inline Tuning& legacy_tuning() {
    static Tuning t;
    return t;
}

// Which inner kernel an entry runs (every path computes the same result, to rounding):
//   Auto    tokens <= tuning().insert_tokens (1): the insert-dot kernel (spmm_gather.h); tokens <=
//           tuning().small_tokens (2): small_rows (x[c] by scalar loads into a buffer); more: the strips
//           with tuning(). The fastest measured on the 2-core Zen 4 (README, "Kernel paths").
//   Legacy  the kernel as it was at commit 403de79: small_rows for tokens <= 2, the strips with
//           legacy_tuning() (no insert-dot), so that old and new are timed side by side in one process.
//   Gather  the vgatherdps gather-dot kernel (spmm_gather.h) at every token count.
//   Xreg    the register-x kernel (spmm_xreg.h; AVX-512 BW builds, else small_rows) at every token count.
//           Gather and Xreg are the two T = 1 alternatives measured slower than small_rows on Zen 4 (kept
//           selectable so that other CPUs can be measured: benchmarks/spmm_table.py cpu@gather, cpu@xreg).
//   Strips  the strips (transposed, token-vectorised) at every token count (tests, benchmarks).
//   Insert  the insert-dot kernel (spmm_gather.h; SSE4.1 builds, else small_rows) at every token count.
enum class Path : int { Auto = 0, Legacy = 1, Gather = 2, Strips = 3, Xreg = 4, Insert = 5 };

namespace detail {

constexpr int kMaxNV = 12;  // vectors per token strip at most (192 tokens on AVX-512; Tuning::max_vectors)
constexpr int64_t kMaxRowBlock = 256;

// ---------------------------------------------------------------------------------------------
// Vector abstraction: V::W floats per vector, masked (partial) loads/stores for tails.
// ---------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
struct V {
    static constexpr int W = 16;
    static constexpr const char* name = "avx512";
    using T = __m512;
    using M = __mmask16;
    static inline T zero() { return _mm512_setzero_ps(); }
    static inline T set1(float a) { return _mm512_set1_ps(a); }
    static inline T load(const float* p) { return _mm512_loadu_ps(p); }
    static inline T loadm(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
    static inline void store(float* p, T a) { _mm512_storeu_ps(p, a); }
    static inline void storem(float* p, T a, M m) { _mm512_mask_storeu_ps(p, m, a); }
    static inline T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
    static inline T add(T a, T b) { return _mm512_add_ps(a, b); }
    static inline M mask(int n) { return static_cast<M>(n >= 16 ? 0xFFFFu : ((1u << n) - 1u)); }
    // gather-dot (spmm_gather.h): W column indices as int32 lanes, scaled, then x[base + lane index]
    using I = __m512i;
    static inline I idx(const int32_t* p) { return _mm512_loadu_si512(p); }
    static inline I idx(const int16_t* p) {
        return _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static inline I scale(I a, int32_t s) { return _mm512_mullo_epi32(a, _mm512_set1_epi32(s)); }
    static inline T gather(const float* b, I i) { return _mm512_i32gather_ps(i, b, 4); }
    static inline T gatherm(const float* b, I i, M m) { return _mm512_mask_i32gather_ps(zero(), m, i, b, 4); }
    // half vector (8 floats) for token counts that end in a half vector (T = 40 = 2.5 x 16)
    static constexpr bool kHasHalf = true;
    static constexpr int kRegs = 32;
    using H = __m256;
    static inline H hzero() { return _mm256_setzero_ps(); }
    static inline H hset1(float a) { return _mm256_set1_ps(a); }
    static inline H hload(const float* p) { return _mm256_loadu_ps(p); }
    static inline void hstore(float* p, H a) { _mm256_storeu_ps(p, a); }
    static inline H hfma(H a, H b, H c) { return _mm256_fmadd_ps(a, b, c); }
    static inline H hadd(H a, H b) { return _mm256_add_ps(a, b); }
    // In-place transpose of a 16x16 block held in 16 registers.
    static inline void transpose(T r[16]) {
        T t[16];
        for (int i = 0; i < 8; ++i) {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        T u[16];
        for (int g = 0; g < 4; ++g) {
            u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
            u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
            u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
            u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int c = 0; c < 4; ++c) {
            const T v = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
            const T w = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
            const T v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
            const T w2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
            r[c] = _mm512_shuffle_f32x4(v, v2, 0x88);
            r[8 + c] = _mm512_shuffle_f32x4(v, v2, 0xdd);
            r[4 + c] = _mm512_shuffle_f32x4(w, w2, 0x88);
            r[12 + c] = _mm512_shuffle_f32x4(w, w2, 0xdd);
        }
    }
};
#elif defined(__AVX2__)
struct V {
    static constexpr int W = 8;
    static constexpr const char* name = "avx2";
    using T = __m256;
    using M = __m256i;
    static inline T zero() { return _mm256_setzero_ps(); }
    static inline T set1(float a) { return _mm256_set1_ps(a); }
    static inline T load(const float* p) { return _mm256_loadu_ps(p); }
    static inline T loadm(const float* p, M m) { return _mm256_maskload_ps(p, m); }
    static inline void store(float* p, T a) { _mm256_storeu_ps(p, a); }
    static inline void storem(float* p, T a, M m) { _mm256_maskstore_ps(p, m, a); }
#if defined(__FMA__)
    static inline T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
#else
    static inline T fma(T a, T b, T c) { return _mm256_add_ps(_mm256_mul_ps(a, b), c); }
#endif
    static inline T add(T a, T b) { return _mm256_add_ps(a, b); }
    static inline M mask(int n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    using I = __m256i;
    static inline I idx(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    static inline I idx(const int16_t* p) {
        return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static inline I scale(I a, int32_t s) { return _mm256_mullo_epi32(a, _mm256_set1_epi32(s)); }
    static inline T gather(const float* b, I i) { return _mm256_i32gather_ps(b, i, 4); }
    static inline T gatherm(const float* b, I i, M m) {
        return _mm256_mask_i32gather_ps(zero(), b, i, _mm256_castsi256_ps(m), 4);
    }
    static constexpr bool kHasHalf = true;
    static constexpr int kRegs = 16;
    using H = __m128;
    static inline H hzero() { return _mm_setzero_ps(); }
    static inline H hset1(float a) { return _mm_set1_ps(a); }
    static inline H hload(const float* p) { return _mm_loadu_ps(p); }
    static inline void hstore(float* p, H a) { _mm_storeu_ps(p, a); }
#if defined(__FMA__)
    static inline H hfma(H a, H b, H c) { return _mm_fmadd_ps(a, b, c); }
#else
    static inline H hfma(H a, H b, H c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
#endif
    static inline H hadd(H a, H b) { return _mm_add_ps(a, b); }
    static inline void transpose(T r[8]) {
        T t[8], u[8];
        for (int i = 0; i < 4; ++i) {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int g = 0; g < 2; ++g) {
            u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
            u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
            u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
            u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int c = 0; c < 4; ++c) {
            r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
            r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
        }
    }
};
#else
struct V {
    static constexpr int W = 1;
    static constexpr const char* name = "scalar";
    using T = float;
    using M = bool;
    static inline T zero() { return 0.0f; }
    static inline T set1(float a) { return a; }
    static inline T load(const float* p) { return *p; }
    static inline T loadm(const float* p, M m) { return m ? *p : 0.0f; }
    static inline void store(float* p, T a) { *p = a; }
    static inline void storem(float* p, T a, M m) {
        if (m) *p = a;
    }
    static inline T fma(T a, T b, T c) { return a * b + c; }
    static inline T add(T a, T b) { return a + b; }
    static inline M mask(int n) { return n > 0; }
    using I = int32_t;
    static inline I idx(const int32_t* p) { return *p; }
    static inline I idx(const int16_t* p) { return *p; }
    static inline I scale(I a, int32_t s) { return a * s; }
    static inline T gather(const float* b, I i) { return b[i]; }
    static inline T gatherm(const float* b, I i, M m) { return m ? b[i] : 0.0f; }
    static inline void transpose(T*) {}
    static constexpr bool kHasHalf = false;  // W = 1 has no half vector
    static constexpr int kRegs = 16;
    using H = float;
    static inline H hzero() { return 0.0f; }
    static inline H hset1(float a) { return a; }
    static inline H hload(const float* p) { return *p; }
    static inline void hstore(float* p, H a) { *p = a; }
    static inline H hfma(H a, H b, H c) { return a * b + c; }
    static inline H hadd(H a, H b) { return a + b; }
};
#endif

inline int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace detail

// Parallel-for policies: par(n, f) calls f(i) once for every i in [0, n), spread over threads with
// dynamic scheduling, and returns when all calls have returned (a fork-join: the calls of one
// par() happen before those of the next). f must not throw.
//   OmpFor   an OpenMP parallel region (the host's OpenMP runtime and thread count).
// The onnxruntime op passes its own policy that runs on onnxruntime's intra-op thread pool
// (OrtApi::KernelContext_ParallelFor), so the op and onnxruntime share one pool of threads.
struct OmpFor {
    template <typename F>
    void operator()(int64_t n, const F& f) const {
        if (n <= 0) return;
        if (n == 1 || detail::num_threads() == 1) {
            for (int64_t i = 0; i < n; ++i) f(i);
            return;
        }
#pragma omp parallel for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; ++i) f(i);
    }
};

namespace detail {

// Reusable 64-byte aligned scratch (one per calling thread).
struct Scratch {
    float* ptr = nullptr;
    size_t cap = 0;
    Scratch() = default;
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() { std::free(ptr); }
    float* get(size_t n) {
        if (n > cap) {
            std::free(ptr);
            ptr = nullptr;
            cap = 0;
            const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
            ptr = static_cast<float*>(std::aligned_alloc(64, bytes));
            if (!ptr) throw std::bad_alloc();
            cap = bytes / sizeof(float);
        }
        return ptr;
    }
};
inline Scratch& scratch_x_buffer() {
    static thread_local Scratch s;
    return s;
}
inline float* scratch_x(size_t n) { return scratch_x_buffer().get(n); }
// Keep at most 64 MiB of transposed activations cached between calls.
inline void trim_scratch_x() {
    Scratch& s = scratch_x_buffer();
    if (s.cap > (size_t{64} << 20) / sizeof(float)) {
        std::free(s.ptr);
        s.ptr = nullptr;
        s.cap = 0;
    }
}
inline float* scratch_tile(size_t n) {
    static thread_local Scratch s;
    return s.get(n);
}

// Copy a rows x cols block src (row stride lds) transposed into dst (row stride ldd):
// dst[j * ldd + i] = src[i * lds + j]. Full WxW blocks go through register transposes.
inline void transpose_block(const float* __restrict src, int64_t lds, int64_t rows, int64_t cols,
                            float* __restrict dst, int64_t ldd) {
    constexpr int W = V::W;
    int64_t i0 = 0;
    if (W > 1) {
        for (; i0 + W <= rows; i0 += W) {
            int64_t j0 = 0;
            for (; j0 + W <= cols; j0 += W) {
                typename V::T r[W > 1 ? W : 1];
                for (int i = 0; i < W; ++i) r[i] = V::load(src + (i0 + i) * lds + j0);
                V::transpose(r);
                for (int j = 0; j < W; ++j) V::store(dst + (j0 + j) * ldd + i0, r[j]);
            }
            for (int64_t j = j0; j < cols; ++j)
                for (int64_t i = i0; i < i0 + W; ++i) dst[j * ldd + i] = src[i * lds + j];
        }
    }
    for (int64_t j = 0; j < cols; ++j)
        for (int64_t i = i0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
}

// Transpose X (tokens x in, row stride ldx) into xt (in x ldt), zero-padding tokens..ldt-1: the
// work item ib covers features [ib * kTransposeBlock, (ib + 1) * kTransposeBlock).
constexpr int64_t kTransposeBlock = 64;
inline void transpose_in(const float* x, int64_t tokens, int64_t in_features, int64_t ldx, float* xt, int64_t ldt,
                         int64_t ib) {
    const int64_t i0 = ib * kTransposeBlock, i1 = std::min(in_features, i0 + kTransposeBlock);
    for (int64_t t0 = 0; t0 < tokens; t0 += 64) {
        const int64_t t1 = std::min(tokens, t0 + 64);
        transpose_block(x + t0 * ldx + i0, ldx, t1 - t0, i1 - i0, xt + i0 * ldt + t0, ldt);
    }
    if (ldt > tokens)
        for (int64_t i = i0; i < i1; ++i) std::memset(xt + i * ldt + tokens, 0, (ldt - tokens) * sizeof(float));
}

// ---------------------------------------------------------------------------------------------
// Blocked strip kernel. Rows [r0, r1) (r1 - r0 <= kMaxRowBlock), tokens [0, NV*W + Half*W/2) of a
// feature-major X^T (row stride ldx, offset to the strip's first token). Accumulates into
// tile[(o - r0) * ldd + ...], which it first fills with the bias. Columns in blocks of C.
// Reads whole vectors of X^T: the caller pads X^T rows to whole vectors.
// ---------------------------------------------------------------------------------------------
template <int NV, bool Half, typename ColT>
inline void strip_block(const float* __restrict xt, int64_t ldx, const int32_t* __restrict crow,
                        const ColT* __restrict col, const float* __restrict val, const float* __restrict bias,
                        int64_t r0, int64_t r1, int64_t in_features, int64_t C, float* __restrict tile,
                        int64_t ldd) {
    using T = typename V::T;
    using H = typename V::H;
    constexpr int W = V::W;
    constexpr int NA = NV > 0 ? NV : 1;
    // a second accumulator set (for the odd nonzero of each pair) when the registers allow it
    constexpr bool Dual = 2 * (NV + (Half ? 1 : 0)) + 3 <= V::kRegs;
    int64_t cur[kMaxRowBlock];
    const int64_t nr = r1 - r0;
    for (int64_t r = 0; r < nr; ++r) {
        cur[r] = crow[r0 + r];
        const float bv = bias ? bias[r0 + r] : 0.0f;
        for (int v = 0; v < NV; ++v) V::store(tile + r * ldd + v * W, V::set1(bv));
        if (Half) V::hstore(tile + r * ldd + NV * W, V::hset1(bv));
    }
    for (int64_t c0 = 0; c0 < in_features; c0 += C) {
        // the last block takes everything left (also makes unsorted rows correct)
        const int64_t cend = (c0 + C >= in_features) ? std::numeric_limits<int64_t>::max() : c0 + C;
        for (int64_t r = 0; r < nr; ++r) {
            int64_t k = cur[r];
            const int64_t end = crow[r0 + r + 1];
            if (k >= end || static_cast<int64_t>(col[k]) >= cend) continue;
            float* d = tile + r * ldd;
            T a0[NA], a1[NA];
            H h0 = V::hzero(), h1 = V::hzero();
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) {
                a0[v] = V::load(d + v * W);
                a1[v] = V::zero();
            }
            if (Half) h0 = V::hload(d + NV * W);
            for (; k + 1 < end && static_cast<int64_t>(col[k + 1]) < cend; k += 2) {
                const float* p0 = xt + static_cast<int64_t>(col[k]) * ldx;
                const float* p1 = xt + static_cast<int64_t>(col[k + 1]) * ldx;
                const float v0 = val[k], v1 = val[k + 1];
                const T w0 = V::set1(v0);
                const T w1 = V::set1(v1);
#pragma GCC unroll 16
                for (int v = 0; v < NV; ++v) a0[v] = V::fma(w0, V::load(p0 + v * W), a0[v]);
                if (Half) h0 = V::hfma(V::hset1(v0), V::hload(p0 + NV * W), h0);
#pragma GCC unroll 16
                for (int v = 0; v < NV; ++v) {
                    if (Dual)
                        a1[v] = V::fma(w1, V::load(p1 + v * W), a1[v]);
                    else
                        a0[v] = V::fma(w1, V::load(p1 + v * W), a0[v]);
                }
                if (Half) {
                    if (Dual)
                        h1 = V::hfma(V::hset1(v1), V::hload(p1 + NV * W), h1);
                    else
                        h0 = V::hfma(V::hset1(v1), V::hload(p1 + NV * W), h0);
                }
            }
            if (k < end && static_cast<int64_t>(col[k]) < cend) {
                const float* p0 = xt + static_cast<int64_t>(col[k]) * ldx;
                const T w0 = V::set1(val[k]);
#pragma GCC unroll 16
                for (int v = 0; v < NV; ++v) a0[v] = V::fma(w0, V::load(p0 + v * W), a0[v]);
                if (Half) h0 = V::hfma(V::hset1(val[k]), V::hload(p0 + NV * W), h0);
                ++k;
            }
            cur[r] = k;
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) V::store(d + v * W, Dual ? V::add(a0[v], a1[v]) : a0[v]);
            if (Half) V::hstore(d + NV * W, Dual ? V::hadd(h0, h1) : h0);
        }
    }
}

template <typename ColT>
inline void strip_block_dispatch(int nv, bool half, const float* xt, int64_t ldx, const int32_t* crow,
                                 const ColT* col, const float* val, const float* bias, int64_t r0, int64_t r1,
                                 int64_t in_features, int64_t C, float* tile, int64_t ldd) {
#define VLS_CASE(N)                                                                                                \
    case N:                                                                                                        \
        if (half)                                                                                                  \
            strip_block<N, true, ColT>(xt, ldx, crow, col, val, bias, r0, r1, in_features, C, tile, ldd);          \
        else                                                                                                       \
            strip_block<N, false, ColT>(xt, ldx, crow, col, val, bias, r0, r1, in_features, C, tile, ldd);         \
        break;
    switch (nv) {
        VLS_CASE(0)
        VLS_CASE(1)
        VLS_CASE(2)
        VLS_CASE(3)
        VLS_CASE(4)
        VLS_CASE(5)
        VLS_CASE(6)
        VLS_CASE(7)
        VLS_CASE(8)
        VLS_CASE(9)
        VLS_CASE(10)
        VLS_CASE(11)
        VLS_CASE(12)
        default: break;
    }
#undef VLS_CASE
}

// Tokens as vectors: `full` whole vectors, then maybe a half vector (when T mod W is 1..W/2),
// cut into strips of at most cap whole vectors (as even as possible); the half goes with the
// last strip. Every strip starts at a multiple of W tokens.
struct StripPlan {
    int64_t nstrips = 1, base = 0, rem = 0;  // the first `rem` strips get base+1 vectors
    bool half = false;
    int64_t start(int64_t s) const { return s * base + std::min(s, rem); }
    int64_t size(int64_t s) const { return base + (s < rem ? 1 : 0); }
    bool has_half(int64_t s) const { return half && s == nstrips - 1; }
};
inline StripPlan plan_strips(int64_t tokens, int64_t in_features, const Tuning& tu) {
    constexpr int64_t W = V::W;
    int64_t full = tokens / W;
    const int64_t r = tokens % W;
    StripPlan p;
    if (r > 0) {
        if (V::kHasHalf && r <= W / 2)
            p.half = true;
        else
            ++full;
    }
    const int64_t per_vec = std::max<int64_t>(1, in_features) * W * 4;
    int64_t cap = tu.l2_strip_bytes / per_vec;
    const int64_t most = in_features >= tu.wide_min_in ? tu.max_vectors : std::min<int64_t>(8, tu.max_vectors);
    cap = std::max<int64_t>(2, std::min<int64_t>(std::min<int64_t>(kMaxNV, most), cap));
    p.nstrips = std::max<int64_t>(1, (full + cap - 1) / cap);
    p.base = full / p.nstrips;
    p.rem = full % p.nstrips;
    return p;
}
inline int64_t block_cols(int64_t nv, bool half, const Tuning& tu) {
    const int64_t floats = std::max<int64_t>(1, nv * V::W + (half ? V::W / 2 : 0));
    int64_t c = tu.l1_block_bytes / (floats * 4);
    c = std::max<int64_t>(tu.min_block_cols, (c / 8) * 8);
    return std::max<int64_t>(1, c);
}
inline int64_t row_block(const Tuning& tu) {
    return std::max<int64_t>(1, std::min<int64_t>(kMaxRowBlock, tu.row_block));
}

// Tile (nr x ldd, tokens along rows) -> Y rows: y[(t) * ldy + r] = tile[r * ldd + t], t < tn.
inline void tile_to_rowmajor(const float* __restrict tile, int64_t ldd, int64_t nr, int64_t tn, float* __restrict y,
                             int64_t ldy) {
    transpose_block(tile, ldd, nr, tn, y, ldy);
}

// ---------------------------------------------------------------------------------------------
// Small-token kernel (1-2 tokens, no transposes). Element (t, c) of X at x[t*xs_t + c*xs_c];
// output (t, o) at y[t*ys_t + o*ys_o]. Per W nonzeros: W values in one vector load, the W
// x[c] gathered by scalar loads into a small buffer (on Zen 4 cheaper than an AVX-512 gather
// instruction), one FMA per token.
// ---------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
static inline float hsum(float v) { return v; }
#endif

#if defined(__GNUC__)
#define VLS_NOINLINE __attribute__((noinline))
#else
#define VLS_NOINLINE
#endif

// noinline: compiled on its own, GCC 12 keeps the gather loop tight (inlined it was 2x slower).
template <int TT, bool UnitC, typename ColT>
VLS_NOINLINE void small_rows(const float* __restrict x, int64_t xs_t, int64_t xs_c, const int32_t* __restrict crow,
                       const ColT* __restrict col, const float* __restrict val, const float* __restrict bias,
                       int64_t r0, int64_t r1, float* __restrict y, int64_t ys_t, int64_t ys_o, Act act) {
    using T = typename V::T;
    constexpr int W = V::W;
    for (int64_t o = r0; o < r1; ++o) {
        T acc[TT];
        float rest[TT];
        for (int t = 0; t < TT; ++t) {
            acc[t] = V::zero();
            rest[t] = 0.0f;
        }
        int64_t k = crow[o];
        const int64_t end = crow[o + 1];
        if (W > 1 && TT == 1) {  // (two tokens: the scalar loop below is faster)
            for (; k + W <= end; k += W) {
                alignas(64) float xs[TT][W];
                for (int u = 0; u < W; ++u) {
                    const float* xp = x + (UnitC ? col[k + u] : static_cast<int64_t>(col[k + u]) * xs_c);
                    for (int t = 0; t < TT; ++t) xs[t][u] = xp[t * xs_t];
                }
                const T w = V::load(val + k);
                for (int t = 0; t < TT; ++t) acc[t] = V::fma(w, V::load(xs[t]), acc[t]);
            }
        }
        if (TT > 1) {
            float rest2[TT];
            for (int t = 0; t < TT; ++t) rest2[t] = 0.0f;
            for (; k + 2 <= end; k += 2) {  // two chains per token
                const float* x0 = x + (UnitC ? col[k] : static_cast<int64_t>(col[k]) * xs_c);
                const float* x1 = x + (UnitC ? col[k + 1] : static_cast<int64_t>(col[k + 1]) * xs_c);
                const float w0 = val[k], w1 = val[k + 1];
                for (int t = 0; t < TT; ++t) {
                    rest[t] += w0 * x0[t * xs_t];
                    rest2[t] += w1 * x1[t * xs_t];
                }
            }
            for (int t = 0; t < TT; ++t) rest[t] += rest2[t];
        }
        for (; k < end; ++k) {
            const float* xp = x + (UnitC ? col[k] : static_cast<int64_t>(col[k]) * xs_c);
            const float w = val[k];
            for (int t = 0; t < TT; ++t) rest[t] += w * xp[t * xs_t];
        }
        const float b = bias ? bias[o] : 0.0f;
        for (int t = 0; t < TT; ++t) {
            const float v = hsum(acc[t]) + rest[t] + b;
            y[t * ys_t + o * ys_o] = act == Act::Gelu ? gelu_erf(v) : v;
        }
    }
}

template <typename ColT, typename Par>
inline void small_tokens(const float* x, int64_t tokens, int64_t xs_t, int64_t xs_c, const int32_t* crow,
                         const ColT* col, const float* val, const float* bias, int64_t out_features, float* y,
                         int64_t ys_t, int64_t ys_o, Act act, const Par& par) {
    const int64_t nblk = (out_features + 63) / 64;
    par(nblk, [&](int64_t b) {
        const int64_t r0 = b * 64, r1 = std::min(out_features, r0 + 64);
        for (int64_t t0 = 0; t0 < tokens; t0 += 2) {
            const int64_t tt = std::min<int64_t>(2, tokens - t0);
            const float* xb = x + t0 * xs_t;
            float* yb = y + t0 * ys_t;
            if (xs_c == 1) {
                if (tt == 1)
                    small_rows<1, true, ColT>(xb, xs_t, 1, crow, col, val, bias, r0, r1, yb, ys_t, ys_o, act);
                else
                    small_rows<2, true, ColT>(xb, xs_t, 1, crow, col, val, bias, r0, r1, yb, ys_t, ys_o, act);
            } else {
                if (tt == 1)
                    small_rows<1, false, ColT>(xb, xs_t, xs_c, crow, col, val, bias, r0, r1, yb, ys_t, ys_o, act);
                else
                    small_rows<2, false, ColT>(xb, xs_t, xs_c, crow, col, val, bias, r0, r1, yb, ys_t, ys_o, act);
            }
        }
    });
}

// The strips of the multi-token kernel over a padded feature-major X^T (in x lds, lanes up to the
// strip plan's end readable): work item i = (strip s, row block b) with i = s * nblk + b computes
// rows [b * R, ...) for the strip's tokens into a per-thread tile, applies the epilogue, and hands
// the tile to write(tile, ldd, r0, nr, t0, tn). Strip widths, row and column blocks from `tu`.
template <typename ColT, typename Par, typename Write>
inline void strips(const float* xs, int64_t lds, int64_t tokens, int64_t in_features, const int32_t* crow,
                   const ColT* col, const float* val, const float* bias, int64_t out_features, Act act,
                   const Par& par, const Write& write, const Tuning& tu) {
    constexpr int64_t W = V::W;
    const StripPlan plan = plan_strips(tokens, in_features, tu);
    const int64_t R = row_block(tu);
    const int64_t nblk = (out_features + R - 1) / R;
    const int64_t tile_len = R * (kMaxNV + 1) * W;
    par(plan.nstrips * nblk, [&](int64_t i) {
        const int64_t s = i / nblk, b = i % nblk;
        const int64_t nv = plan.size(s);
        const bool half = plan.has_half(s);
        const int64_t t0 = plan.start(s) * W;
        const int64_t tn = std::min(tokens, t0 + nv * W + (half ? W / 2 : 0)) - t0;  // real tokens
        const int64_t ldd = (nv + (half ? 1 : 0)) * W;
        const int64_t r0 = b * R, r1 = std::min(out_features, r0 + R);
        float* tile = scratch_tile(static_cast<size_t>(tile_len));
        strip_block_dispatch<ColT>(static_cast<int>(nv), half, xs + t0, lds, crow, col, val, bias, r0, r1,
                                   in_features, block_cols(nv, half, tu), tile, ldd);
        if (act == Act::Gelu)
            for (int64_t r = 0; r < r1 - r0; ++r) gelu_erf_inplace(tile + r * ldd, tn);
        write(tile, ldd, r0, r1 - r0, t0, tn);
    });
}

}  // namespace detail
}  // namespace vlsparse

#include "spmm_gather.h"  // the gather-dot kernel (uses detail::V, hsum, gelu_erf from above)
#include "spmm_xreg.h"    // the register-x kernel (AVX-512 BW; same)

namespace vlsparse {
namespace detail {
// The small-token kernels: runs the layer and returns true when `path` (with `tokens`) picks one of them
// (Auto: tokens <= tuning().insert_tokens -> insert-dot, <= small_tokens -> small_rows; Legacy: tokens <=
// legacy_tuning().small_tokens -> small_rows; Xreg / Gather / Insert: that kernel at every token count,
// small_rows where it cannot run; Strips: never), and whenever there is no input feature. Element (t, c) of X at x[t * xs_t + c * xs_c],
// output (t, o) at y[t * ys_t + o * ys_o].
template <typename ColT, typename Par>
bool small_path(Path path, const float* x, int64_t tokens, int64_t in_features, int64_t xs_t, int64_t xs_c,
                const int32_t* crow, const ColT* col, const float* val, const float* bias, int64_t out_features,
                float* y, int64_t ys_t, int64_t ys_o, Act act, const Par& par) {
    if (in_features > 0 && path == Path::Xreg && kHasXreg) {
        xreg_tokens<ColT>(x, tokens, in_features, xs_t, xs_c, crow, col, val, bias, out_features, y, ys_t, ys_o, act,
                          par);
        return true;
    }
    const bool insert = path == Path::Insert || (path == Path::Auto && tokens <= tuning().insert_tokens);
    if (in_features > 0 && insert && kHasInsert) {
        insert_tokens<ColT>(x, tokens, xs_t, xs_c, crow, col, val, bias, out_features, y, ys_t, ys_o, act, par);
        return true;
    }
    if (in_features > 0 && path == Path::Gather && gather_fits(in_features, xs_c)) {
        gather_tokens<ColT>(x, tokens, xs_t, xs_c, crow, col, val, bias, out_features, y, ys_t, ys_o, act, par);
        return true;
    }
    const bool small = (path == Path::Auto && tokens <= tuning().small_tokens) ||
                       (path == Path::Legacy && tokens <= legacy_tuning().small_tokens);
    if (in_features <= 0 || small || path == Path::Xreg || path == Path::Gather || path == Path::Insert) {
        small_tokens<ColT>(x, tokens, xs_t, xs_c, crow, col, val, bias, out_features, y, ys_t, ys_o, act, par);
        return true;
    }
    return false;
}
inline const Tuning& tuning_for(Path path) { return path == Path::Legacy ? legacy_tuning() : tuning(); }
}  // namespace detail

// One token: y (out_features) = W x + bias (small_rows: no in_features here for the register-x kernel).
template <typename ColT, typename Par = OmpFor>
void spmv_f32(const float* x, const int32_t* crow_indices, const ColT* col_indices, const float* values,
              const float* bias, int64_t out_features, float* y, Act act = Act::None, const Par& par = Par()) {
    if (out_features <= 0) return;
    detail::small_tokens<ColT>(x, 1, 0, 1, crow_indices, col_indices, values, bias, out_features, y, 0, 1, act, par);
}

namespace detail {
// Both row-major-input entries: the small-token kernels (small_path; output (t, o) at y[t * ys_t + o * ys_o]),
// else X is transposed into a padded feature-major scratch and run as strips, each tile handed to
// write(tile, ldd, r0, nr, t0, tn).
template <typename ColT, typename Par, typename Write>
void rm_entry(const float* x, int64_t tokens, int64_t in_features, const int32_t* crow, const ColT* col,
              const float* val, const float* bias, int64_t out_features, Act act, const Par& par, float* y,
              int64_t ys_t, int64_t ys_o, const Write& write, Path path) {
    static_assert(std::is_same<ColT, int16_t>::value || std::is_same<ColT, int32_t>::value,
                  "col indices must be int16_t or int32_t");
    if (tokens <= 0 || out_features <= 0) return;
    if (small_path<ColT>(path, x, tokens, in_features, in_features, 1, crow, col, val, bias, out_features, y, ys_t,
                         ys_o, act, par))
        return;
    constexpr int64_t W = V::W;
    const int64_t ldt = (tokens + W - 1) / W * W;
    float* xt = scratch_x(static_cast<size_t>(in_features * ldt));
    par((in_features + kTransposeBlock - 1) / kTransposeBlock,
        [&](int64_t ib) { transpose_in(x, tokens, in_features, in_features, xt, ldt, ib); });
    strips<ColT>(xt, ldt, tokens, in_features, crow, col, val, bias, out_features, act, par, write, tuning_for(path));
    trim_scratch_x();
}

// Tile rows -> rows of a feature-major Y^T (row stride ldy): yt[(r0 + r) * ldy + t0 + t] = tile[r * ldd + t].
inline void tile_to_featuremajor(const float* tile, int64_t ldd, int64_t r0, int64_t nr, int64_t t0, int64_t tn,
                                 float* yt, int64_t ldy) {
    for (int64_t r = 0; r < nr; ++r)
        std::memcpy(yt + (r0 + r) * ldy + t0, tile + r * ldd, static_cast<size_t>(tn) * sizeof(float));
}
}  // namespace detail

// Y (tokens x out_features, row-major) = act(X (tokens x in_features, row-major) * W^T + bias), W given in CSR
// by output row. crow_indices: out_features+1 int32; col_indices: nnz of ColT (int16_t or int32_t); values:
// nnz float; bias may be nullptr. Parallel over output rows (and token strips) with `par`; `path` picks the
// inner kernel (Auto: by token count).
template <typename ColT, typename Par = OmpFor>
void spmm_f32(const float* x, int64_t tokens, int64_t in_features, const int32_t* crow_indices,
              const ColT* col_indices, const float* values, const float* bias, int64_t out_features, float* y,
              Act act = Act::None, const Par& par = Par(), Path path = Path::Auto) {
    detail::rm_entry<ColT>(x, tokens, in_features, crow_indices, col_indices, values, bias, out_features, act, par, y,
                           out_features, 1,
                           [&](const float* tile, int64_t ldd, int64_t r0, int64_t nr, int64_t t0, int64_t tn) {
                               detail::tile_to_rowmajor(tile, ldd, nr, tn, y + t0 * out_features + r0, out_features);
                           }, path);
}

// Row-major in, feature-major out: Y^T (out_features x ldy, ldy >= tokens) = act(W X^T + bias) from X
// (tokens x in_features, row-major). The first layer of a feature-major chain (the intermediate Linear
// whose result feeds the output Linear); columns tokens..ldy-1 of Y^T are not written.
template <typename ColT, typename Par = OmpFor>
void spmm_f32_rm_fm(const float* x, int64_t tokens, int64_t in_features, const int32_t* crow_indices,
                    const ColT* col_indices, const float* values, const float* bias, int64_t out_features, float* yt,
                    int64_t ldy, Act act = Act::None, const Par& par = Par(), Path path = Path::Auto) {
    detail::rm_entry<ColT>(x, tokens, in_features, crow_indices, col_indices, values, bias, out_features, act, par, yt,
                           1, ldy,
                           [&](const float* tile, int64_t ldd, int64_t r0, int64_t nr, int64_t t0, int64_t tn) {
                               detail::tile_to_featuremajor(tile, ldd, r0, nr, t0, tn, yt, ldy);
                           }, path);
}

namespace detail {
// Feature-major input X^T (in x ldx): used in place when 64-byte aligned with ldx a multiple of the
// vector width, else copied into an aligned, zero-padded buffer; then the strips (tunables `tu`), each
// tile handed to write(tile, ldd, r0, nr, t0, tn).
template <typename ColT, typename Par, typename Write>
void fm_strips(const float* xt, int64_t tokens, int64_t in_features, int64_t ldx, const int32_t* crow,
               const ColT* col, const float* val, const float* bias, int64_t out_features, Act act, const Par& par,
               const Write& write, const Tuning& tu) {
    constexpr int64_t W = V::W;
    const int64_t ldt = (tokens + W - 1) / W * W;
    const bool in_place = (reinterpret_cast<uintptr_t>(xt) % (W * sizeof(float)) == 0) && (ldx % W == 0);
    float* xpad = in_place ? nullptr : scratch_x(static_cast<size_t>(in_features * ldt));
    if (!in_place)
        par((in_features + kTransposeBlock - 1) / kTransposeBlock, [&](int64_t ib) {
            const int64_t i0 = ib * kTransposeBlock, i1 = std::min(in_features, i0 + kTransposeBlock);
            for (int64_t i = i0; i < i1; ++i) {
                std::memcpy(xpad + i * ldt, xt + i * ldx, static_cast<size_t>(tokens) * sizeof(float));
                std::memset(xpad + i * ldt + tokens, 0, static_cast<size_t>(ldt - tokens) * sizeof(float));
            }
        });
    strips<ColT>(in_place ? xt : xpad, in_place ? ldx : ldt, tokens, in_features, crow, col, val, bias, out_features,
                 act, par, write, tu);
    if (!in_place) trim_scratch_x();
}

// Both feature-major entries: the small-token kernels (small_path; output (t, o) at y[t * ys_t + o * ys_o]),
// else fm_strips with `write`.
template <typename ColT, typename Par, typename Write>
void fm_entry(const float* xt, int64_t tokens, int64_t in_features, int64_t ldx, const int32_t* crow, const ColT* col,
              const float* val, const float* bias, int64_t out_features, Act act, const Par& par, float* y,
              int64_t ys_t, int64_t ys_o, const Write& write, Path path) {
    static_assert(std::is_same<ColT, int16_t>::value || std::is_same<ColT, int32_t>::value,
                  "col indices must be int16_t or int32_t");
    if (tokens <= 0 || out_features <= 0) return;
    if (small_path<ColT>(path, xt, tokens, in_features, 1, ldx, crow, col, val, bias, out_features, y, ys_t, ys_o, act,
                         par))
        return;
    fm_strips<ColT>(xt, tokens, in_features, ldx, crow, col, val, bias, out_features, act, par, write,
                    tuning_for(path));
}
}  // namespace detail

// Feature-major: Y^T (out_features x ldy) = act(W X^T + bias), X^T (in_features x ldx), columns
// 0..tokens-1 used (ldx, ldy >= tokens; columns tokens..ldy-1 of Y^T are not written).
// Fastest when xt is 64-byte aligned and ldx a multiple of 16 (AVX-512; 8 floats on AVX2): then
// X^T is used in place (lanes tokens..roundup(tokens, 16)-1 are read and their results dropped);
// otherwise it is first copied into an aligned, padded buffer.
template <typename ColT, typename Par = OmpFor>
void spmm_f32_fm(const float* xt, int64_t tokens, int64_t in_features, int64_t ldx, const int32_t* crow_indices,
                 const ColT* col_indices, const float* values, const float* bias, int64_t out_features, float* yt,
                 int64_t ldy, Act act = Act::None, const Par& par = Par(), Path path = Path::Auto) {
    detail::fm_entry<ColT>(xt, tokens, in_features, ldx, crow_indices, col_indices, values, bias, out_features, act, par,
                           yt, 1, ldy, [&](const float* tile, int64_t ldd, int64_t r0, int64_t nr, int64_t t0, int64_t tn) {
                               detail::tile_to_featuremajor(tile, ldd, r0, nr, t0, tn, yt, ldy);
                           }, path);
}

// Feature-major in, row-major out: Y (tokens x out_features) = act(X W^T + bias) from X^T (in_features x
// ldx) as for spmm_f32_fm. The last of a chain of feature-major layers (no transpose of X; the tiles
// are transposed in registers on their way out).
template <typename ColT, typename Par = OmpFor>
void spmm_f32_fm_rm(const float* xt, int64_t tokens, int64_t in_features, int64_t ldx, const int32_t* crow_indices,
                    const ColT* col_indices, const float* values, const float* bias, int64_t out_features, float* y,
                    Act act = Act::None, const Par& par = Par(), Path path = Path::Auto) {
    detail::fm_entry<ColT>(xt, tokens, in_features, ldx, crow_indices, col_indices, values, bias, out_features, act, par,
                           y, out_features, 1,
                           [&](const float* tile, int64_t ldd, int64_t r0, int64_t nr, int64_t t0, int64_t tn) {
                               detail::tile_to_rowmajor(tile, ldd, nr, tn, y + t0 * out_features + r0, out_features);
                           }, path);
}

// Which vector path this translation unit was compiled with: "avx512", "avx2" or "scalar".
inline const char* simd_name() { return detail::V::name; }

// The inner kernel `path` runs for `tokens` tokens (with in_features > 0 and indices that fit the gather):
// "xreg", "gather", "small_rows" or "strips".
inline const char* path_name(Path path, int64_t tokens) {
    if (path == Path::Gather) return "gather";
    if (path == Path::Xreg) return detail::kHasXreg ? "xreg" : "small_rows";
    if (path == Path::Insert || (path == Path::Auto && tokens <= tuning().insert_tokens))
        return detail::kHasInsert ? "insert" : "small_rows";
    const int64_t small = path == Path::Legacy ? legacy_tuning().small_tokens : tuning().small_tokens;
    return path != Path::Strips && tokens <= small ? "small_rows" : "strips";
}

}  // namespace vlsparse

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
