// int8 weights x int16 activations for the decode step (included by decode.cpp).
//
// Why: widening every int8 weight to fp32 before an FMA costs three instructions per 16 weights
// and per row; int8 activations in blocks of 32 (llama.cpp's q8_0) made the product integer but
// still cost, per row and 64 weights, a convert and an FMA with the block's scale, and held the
// teacher-forced agreement of benchmarks/int8_quality.py at 98.91%. Here each matmul input row is
// quantized on the fly with one scale (per-row dynamic quantization) to int16: q = round-half-even
// (x * Q / max|x|) with Q = min(32767, (2^31 - 1) / (127 K)), so a whole row's dot product with an
// int8 weight row (quant.py: one fp32 scale per output row, weights in [-127, 127]) is exact in
// int32 over all of K (K x Q x 127 < 2^31 bounds every partial sum too), and is converted to fp32
// once, at the end: y = float(sum) * d * weight scale, d = max|x| / Q. Measured on the tiny
// checkpoint: int16 per row agrees 99.06% with fp32 as the unquantized int8 forward does, int8
// per row 98.59%, int8 in blocks of 128 98.79% (so int8 activations were not kept anywhere).
// Integer products need int16 lanes (vpmaddwd / vpdpwssd: 32 per 512 bits): one instruction per
// 32 weights and row with VNNI, two without, and the weights are widened once per load and shared
// by every row of the register tile.
//
// A row's result depends only on that row: its integer sum is exact, so neither the tile that
// computed it nor the order of the partial sums can change it, and the fp32 epilogue (q8_store)
// is the same sequence for every row whatever M is. So a token's logits do not depend on the rows
// it ran with (the engine relies on it: a position is computed alike in a prefill and a step).
//
// The instruction path is chosen at compile time from what -march defines:
//   AVX512-VNNI: vpdpwssd on 32 int16 lanes (s16 x s16 pairs into s32) after vpmovsxbw;
//   AVX512BW:    the same with vpmaddwd + vpaddd;
//   AVX-VNNI:    vpdpwssd on 256 bits;
//   AVX2:        vpmaddwd + vpaddd on 256 bits (|w| <= 127: a pair never reaches -2^31);
//   otherwise:   plain loops, which GCC vectorizes for the target (NEON, SSE).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define Q8_512 1
#ifdef __AVX512VNNI__
#define Q8_VNNI 1
#define Q8_PATH "avx512-vnni"
#else
#define Q8_PATH "avx512bw"
#endif
#elif defined(__AVX2__)
#define Q8_256 1
#ifdef __AVXVNNI__
#define Q8_VNNI 1
#define Q8_PATH "avx-vnni"
#else
#define Q8_PATH "avx2"
#endif
#else
#define Q8_PATH "portable"
#endif

// The register tile: Q8_R activation rows x Q8_NW weight rows, R * NW int32 accumulators (AVX-512
// has 32 registers, AVX2 16). Each weight vector, once widened, feeds R rows and each activation
// vector NW weight rows.
// Measured on one Xeon core, operands in L1: 6 x 4 106 GMAC/s at K = 768, 4 x 4 80, 4 x 8 38
// (spills); AVX2 (-march=haswell) 4 x 2 ~30, 3 x 3 ~22.
#ifndef Q8_R
#if defined(Q8_512)
#define Q8_R 6
#define Q8_NW 4
#else
#define Q8_R 4
#define Q8_NW 2
#endif
#endif

// M rows of K quantized values: row m's at q + m * KP (zero from K to KP), its scale d at s[m].
struct Q8Rows {
    int16_t* q;
    float* s;
    int64_t K, KP;
};

constexpr int Q8_LINE = 64;  // weight bytes per step of the dot loop: one cache line per weight row

static inline int64_t q8_padded(int64_t K) { return (K + Q8_LINE - 1) / Q8_LINE * Q8_LINE; }

// p rounded up to a 64-byte line (the buffer has 32 values spare): rows of KP values then start at
// lines, and a vector load never straddles two (measured: 15% on a 512-row product)
static inline int16_t* q8_align(int16_t* p) { return (int16_t*)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

// The buffers (sized for the widest input) seen as rows of K values.
static inline Q8Rows q8_view(int16_t* q, float* s, int64_t K) { return Q8Rows{q, s, K, q8_padded(K)}; }

// The largest |q| for rows of K values: what keeps K x Q x 127 within int32.
static inline int32_t q8_range(int64_t K) {
    const int64_t q = (int64_t)INT32_MAX / ((K > 0 ? K : 1) * 127);
    return q < 32767 ? (int32_t)q : 32767;
}

// Quantize row m from x (its K values); K..KP become zeros, so a buffer reused for another K
// never leaves stale values in a dot product.
static inline void q8_row(const float* x, Q8Rows& X, int m) {
    const int64_t K = X.K;
    // max |x| 16 lanes at a time: GCC leaves a float max reduction scalar, a 4-cycle chain per value
    // (a tenth of a 512-token prefill's profile); the max of the same values in any order is the same
    typedef float f16v __attribute__((vector_size(64)));
    f16v m16 = {};
    int64_t i = 0;
    for (; i + 16 <= K; i += 16) {
        f16v v;
        std::memcpy(&v, x + i, 64);
        v = v < 0 ? -v : v;
        m16 = v > m16 ? v : m16;
    }
    float amax = 0;
    for (int j = 0; j < 16; j++) amax = m16[j] > amax ? m16[j] : amax;
    for (; i < K; i++) amax = std::fabs(x[i]) > amax ? std::fabs(x[i]) : amax;
    const float Q = (float)q8_range(K);
    const float id = amax > 0 ? Q / amax : 0.0f;
    int16_t* q = X.q + (size_t)m * X.KP;
    for (i = 0; i < K; i++) {
        // nearbyint rounds half to even (the default mode), as torch.round does in the tests
        const float r = std::nearbyint(x[i] * id);
        q[i] = (int16_t)(r > Q ? Q : (r < -Q ? -Q : r));
    }
    for (i = K; i < X.KP; i++) q[i] = 0;
    X.s[m] = amax / Q;
}

#ifndef Q8_PREFETCH
#define Q8_PREFETCH 4096
#endif
// Ask for the weights Q8_PREFETCH bytes ahead (one call per 64-byte line): the hardware prefetcher
// stops at each 4 KiB page, and without this a one-row step waited on memory there (measured at
// 303M on 2 cores: 21 -> 14 ms). Prefetching never faults, so reading past the matrix is harmless.
#ifndef Q8_PF_HINT
#define Q8_PF_HINT 3
#endif
static inline void q8_prefetch(const int8_t* p) { __builtin_prefetch(p + Q8_PREFETCH, 0, Q8_PF_HINT); }

// The one fp32 epilogue of every (row, weight row): the exact sum times the row's scale d, times
// the weight row's scale, stored or added (an explicit fma where the target has one, so the
// compiler's contraction choices cannot make two call sites round differently).
static inline void q8_store(float* out, int32_t sum, float d, float sc, bool accumulate) {
    const float t = (float)sum * d;
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
    *out = accumulate ? __builtin_fmaf(t, sc, *out) : t * sc;
#else
    *out = accumulate ? *out + t * sc : t * sc;
#endif
}

#if defined(Q8_512) || defined(Q8_256)
#define Q8_VEC 1
#ifdef Q8_512
typedef __m512i q8v;
constexpr int Q8_LANES = 32;  // int16 lanes: weights per vector
static inline q8v q8_zero() { return _mm512_setzero_si512(); }
static inline q8v q8_load(const int16_t* p) { return _mm512_loadu_si512(p); }
static inline void q8_put(int16_t* p, q8v v) { _mm512_storeu_si512(p, v); }
static inline q8v q8_load(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p)); }
// the row's last n < 32 weights: a masked load never reads past the row's end
static inline q8v q8_load_tail(const int8_t* p, int64_t n) {
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8((__mmask32)((1ULL << n) - 1), p));
}
#ifdef Q8_VNNI
// inline asm: with the intrinsic, GCC 12 copied every accumulator to a scratch register and back
// around each vpdpwssd (and spilled two of sixteen), a third of the loop's instructions
static inline q8v q8_dp(q8v acc, q8v x, q8v w) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
    return acc;
}
#else
static inline q8v q8_dp(q8v acc, q8v x, q8v w) { return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w)); }
#endif
static inline int32_t q8_sum(q8v a) { return _mm512_reduce_add_epi32(a); }
// the sums of four accumulators as one vector: each fold adds two vectors' halves into one (3
// instructions), 14 in all against 32 for four separate reductions
static inline __m128i q8_sum4(q8v a, q8v b, q8v c, q8v d) {
    const __m512i ab = _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x44), _mm512_shuffle_i64x2(a, b, 0xee));
    const __m512i cd = _mm512_add_epi32(_mm512_shuffle_i64x2(c, d, 0x44), _mm512_shuffle_i64x2(c, d, 0xee));
    // 128-bit lanes: a, b, c, d (4 partial sums each), then gathered as a0 b0 c0 d0 | a1 b1 c1 d1 | ..
    const __m512i t = _mm512_add_epi32(_mm512_shuffle_i64x2(ab, cd, 0x88), _mm512_shuffle_i64x2(ab, cd, 0xdd));
    const __m512i u = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), t);
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
#else
typedef __m256i q8v;
constexpr int Q8_LANES = 16;
static inline q8v q8_zero() { return _mm256_setzero_si256(); }
static inline q8v q8_load(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline void q8_put(int16_t* p, q8v v) { _mm256_storeu_si256((__m256i*)p, v); }
static inline q8v q8_load(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
// the row's last n < 16 weights, copied so no byte past the row's end is read
static inline q8v q8_load_tail(const int8_t* p, int64_t n) {
    alignas(16) int8_t t[16] = {};
    std::memcpy(t, p, (size_t)n);
    return _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i*)t));
}
#ifdef Q8_VNNI
static inline q8v q8_dp(q8v acc, q8v x, q8v w) {  // asm: as on 512 bits
    __asm__("{vex} vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(x), "x"(w));
    return acc;
}
#else
static inline q8v q8_dp(q8v acc, q8v x, q8v w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
#endif
static inline int32_t q8_sum(q8v a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}
static inline __m128i q8_sum4(q8v a, q8v b, q8v c, q8v d) {
    const __m256i ab = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
    const __m256i cd = _mm256_add_epi32(_mm256_permute2x128_si256(c, d, 0x20), _mm256_permute2x128_si256(c, d, 0x31));
    __m256i t = _mm256_hadd_epi32(ab, cd);  // lanes: a a c c | b b d d (pair sums)
    t = _mm256_hadd_epi32(t, t);            // a c a c | b d b d
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));  // a b c d
}
#endif
// a widened copy (q8_widen) is read as it is: its rows are zero from K on
static inline q8v q8_load_tail(const int16_t* p, int64_t) { return q8_load(p); }

// q8_store for four weight rows at once: the same operations lane by lane, so the same bits
static inline void q8_store4(float* out, __m128i sums, float d, const float* sc, bool accumulate) {
    const __m128 t = _mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_set1_ps(d)), s = _mm_loadu_ps(sc);
    _mm_storeu_ps(out, accumulate ? _mm_fmadd_ps(t, s, _mm_loadu_ps(out)) : _mm_mul_ps(t, s));
}

// Rows m0..m0+R-1 against weight rows n..n+NW-1, row j's K weights at w + j * ldw: int8 (widened
// as they are loaded) or a widened copy. PF: prefetch them (they come from memory).
template <int R, int NW, bool PF, typename WT>
static inline void q8_tile(const Q8Rows& X, int m0, const WT* w, int64_t ldw, const float* sc, float* y,
                           int64_t ldy, int64_t n, bool accumulate) {
    q8v acc[R][NW];
    for (int r = 0; r < R; r++) for (int j = 0; j < NW; j++) acc[r][j] = q8_zero();
    constexpr bool widened = sizeof(WT) == 2;  // rows zero from K on: no partial vector
    const int64_t K = X.K, KP = X.KP, KL = widened ? K : K - K % Q8_LANES;
    const int16_t* x = X.q + (size_t)m0 * KP;
    auto step = [&](int64_t k, bool tail) {
        q8v wv[NW];
        for (int j = 0; j < NW; j++) wv[j] = tail ? q8_load_tail(w + j * ldw + k, K - k) : q8_load(w + j * ldw + k);
        for (int r = 0; r < R; r++) {  // x is zero from K to KP: a whole vector of it is read
            const q8v xv = q8_load(x + (size_t)r * KP + k);
            for (int j = 0; j < NW; j++) acc[r][j] = q8_dp(acc[r][j], xv, wv[j]);
        }
    };
    int64_t k = 0;
    for (; k < KL; k += Q8_LANES) {
        if (PF && k % Q8_LINE == 0) for (int j = 0; j < NW; j++) q8_prefetch((const int8_t*)(w + j * ldw + k));
        step(k, false);
    }
    if (!widened && k < K) step(k, true);
    for (int r = 0; r < R; r++) {
        float* out = y + (size_t)(m0 + r) * ldy + n;
        int j = 0;
        for (; j + 4 <= NW; j += 4)
            q8_store4(out + j, q8_sum4(acc[r][j], acc[r][j + 1], acc[r][j + 2], acc[r][j + 3]), X.s[m0 + r], sc + j,
                      accumulate);
        for (; j < NW; j++) q8_store(out + j, q8_sum(acc[r][j]), X.s[m0 + r], sc[j], accumulate);
    }
}

// nw weight rows of K int8 values (row j at w + j * K) as int16 rows of KP at out, zero from K on
static inline void q8_widen(const int8_t* w, int64_t K, int nw, int16_t* out, int64_t KP) {
    const int64_t KL = K - K % Q8_LANES;
    for (int j = 0; j < nw; j++) {
        const int8_t* wr = w + j * K;
        int16_t* o = out + j * KP;
        int64_t k = 0;
        for (; k < KL; k += Q8_LANES) {
            if (k % Q8_LINE == 0) q8_prefetch(wr + k);
            q8_put(o + k, q8_load(wr + k));
        }
        if (k < K) q8_put(o + k, q8_load_tail(wr + k, K - k)), k += Q8_LANES;
        for (; k < KP; k += Q8_LANES) q8_put(o + k, q8_zero());
    }
}
#else
template <int R, int NW, bool PF, typename WT>
static inline void q8_tile(const Q8Rows& X, int m0, const WT* w, int64_t ldw, const float* sc, float* y,
                           int64_t ldy, int64_t n, bool accumulate) {
    const int64_t K = X.K;
    for (int j = 0; j < NW; j++) {
        const WT* wr = w + j * ldw;
        if (PF) for (int64_t k = 0; k < K; k += Q8_LINE) q8_prefetch((const int8_t*)(wr + k));
        for (int r = 0; r < R; r++) {
            const int16_t* q = X.q + (size_t)(m0 + r) * X.KP;
            int32_t sum = 0;
            for (int64_t k = 0; k < K; k++) sum += (int32_t)q[k] * (int32_t)wr[k];
            q8_store(y + (size_t)(m0 + r) * ldy + n + j, sum, X.s[m0 + r], sc[j], accumulate);
        }
    }
}
#endif

// r (1..Q8_R) rows from m0 against NW weight rows
template <int NW, bool PF, typename WT>
static inline void q8_tile_rows(int r, const Q8Rows& X, int m0, const WT* w, int64_t ldw, const float* sc,
                                float* y, int64_t ldy, int64_t n, bool accumulate) {
    static_assert(Q8_R >= 1 && Q8_R <= 8, "Q8_R: 1 to 8 rows");
#define Q8_CASE(i) case i: q8_tile<i <= Q8_R ? i : 1, NW, PF>(X, m0, w, ldw, sc, y, ldy, n, accumulate); break;
    switch (r) {
        Q8_CASE(8) Q8_CASE(7) Q8_CASE(6) Q8_CASE(5) Q8_CASE(4) Q8_CASE(3) Q8_CASE(2)
        default: q8_tile<1, NW, PF>(X, m0, w, ldw, sc, y, ldy, n, accumulate); break;
    }
#undef Q8_CASE
}

// Rows m0..m1-1 against weight rows n..n+nw-1 (nw <= Q8_NW), Q8_R rows at a time. With more than
// Q8_WIDEN_ROWS rows the group is widened to int16 once, into a per-thread buffer in L1, and every
// row block reads that: the widening (one shuffle per 32 weights, on the port the products
// also use) is then paid once, not once per row block.
#ifndef Q8_WIDEN_ROWS
#define Q8_WIDEN_ROWS Q8_R
#endif
static inline void q8_group(int m0, int m1, const Q8Rows& X, const int8_t* w, const float* sc, int nw, float* y,
                            int64_t ldy, int64_t n, bool accumulate) {
    const int64_t K = X.K;
#ifdef Q8_VEC
    if (m1 - m0 > Q8_WIDEN_ROWS) {
        static thread_local int16_t* buf = nullptr;
        static thread_local int64_t cap = 0;
        if (cap < Q8_NW * X.KP) {
            ::operator delete[](buf, std::align_val_t(64));
            cap = Q8_NW * X.KP;
            buf = (int16_t*)::operator new[](cap * 2, std::align_val_t(64));
        }
        q8_widen(w, K, nw, buf, X.KP);
        for (int m = m0; m < m1; m += Q8_R) {
            const int r = m1 - m < Q8_R ? m1 - m : Q8_R;
            if (nw == Q8_NW) q8_tile_rows<Q8_NW, false>(r, X, m, (const int16_t*)buf, X.KP, sc, y, ldy, n, accumulate);
            else
                for (int j = 0; j < nw; j++)
                    q8_tile_rows<1, false>(r, X, m, (const int16_t*)buf + j * X.KP, X.KP, sc + j, y, ldy, n + j, accumulate);
        }
        return;
    }
#endif
    for (int m = m0; m < m1; m += Q8_R) {
        const int r = m1 - m < Q8_R ? m1 - m : Q8_R;
        if (nw == Q8_NW) {
            if (m == m0) q8_tile_rows<Q8_NW, true>(r, X, m, w, K, sc, y, ldy, n, accumulate);
            else q8_tile_rows<Q8_NW, false>(r, X, m, w, K, sc, y, ldy, n, accumulate);
        } else {
            for (int j = 0; j < nw; j++) {
                if (m == m0) q8_tile_rows<1, true>(r, X, m, w + j * K, K, sc + j, y, ldy, n + j, accumulate);
                else q8_tile_rows<1, false>(r, X, m, w + j * K, K, sc + j, y, ldy, n + j, accumulate);
            }
        }
    }
}

#include "q8gemm.h"

#ifndef Q8_TILE_BYTES
#define Q8_TILE_BYTES (256 * 1024)
#endif
// y[m*ldy + n] (=, or +=) dot(x row m, W row n) * scale[n] for the quantized rows X; groups of
// Q8_NW weight rows split across threads. Many rows go in tiles of about Q8_TILE_BYTES of
// activations, which stay in L2 while every weight group of the thread passes over them. Must be
// called inside a parallel region.
static void gemv_q8(int M, const Q8Rows& X, const int8_t* W, const float* scale, int64_t N, float* y,
                    int64_t ldy, bool accumulate) {
    const int64_t K = X.K, groups = (N + Q8_NW - 1) / Q8_NW;
#ifdef Q8_GEMM
    if (M >= Q8G_MIN_ROWS) return gemm_q8(M, X, W, scale, N, y, ldy, accumulate);
#endif
    int64_t mt = Q8_TILE_BYTES / (X.KP * 2);
    mt = mt < Q8_R ? Q8_R : mt;
    const int64_t tiles = (M + mt - 1) / mt;  // tiles of equal size, each a whole number of row blocks
    mt = ((M + tiles - 1) / tiles + Q8_R - 1) / Q8_R * Q8_R;
    for (int m0 = 0; m0 < M; m0 += (int)mt) {
        const int m1 = M - m0 < mt ? M : m0 + (int)mt;
#ifdef Q8_DYNAMIC
        #pragma omp for schedule(dynamic, Q8_DYNAMIC) nowait
#else
        #pragma omp for schedule(static) nowait
#endif
        for (int64_t g = 0; g < groups; g++) {
            const int64_t n = g * Q8_NW;
            const int nw = N - n < Q8_NW ? (int)(N - n) : Q8_NW;
            q8_group(m0, m1, X, W + (size_t)n * K, scale + n, nw, y, ldy, n, accumulate);
        }
    }
    #pragma omp barrier
}
