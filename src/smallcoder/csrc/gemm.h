// fp32 and bf16 weights (and int8 widened to fp32, the SC_INT8_WIDEN build) times fp32
// activation rows, for the decode step (included by decode.cpp).
//
// Why one canonical order: a token's logits must not depend on which rows share its step (a
// speculative verify step of k+1 rows must give plain decoding's tokens, a prefill chunk the same
// logits as decode steps). So every (row, weight row) product is summed in one fixed way, whatever
// M is and whichever block computes it: one VL-lane accumulator, an FMA per VL values in k order,
// the last partial chunk zero-padded (0 * 0 adds nothing), one fixed horizontal sum, then the
// scale. Blocks only decide which rows share a load, never a row's order.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "attend.h"

enum WType { F32 = 0, BF16 = 1, I8 = 2 };

static inline size_t wsize(int wt) { return wt == F32 ? 4 : (wt == BF16 ? 2 : 1); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GEMM_PATH "avx512"
typedef __m512 vf;
constexpr int VL = 16;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf loadx(const float* p) { return _mm512_loadu_ps(p); }
// n < VL values, the other lanes zero (masked loads never touch the bytes past n)
static inline vf loadx_part(const float* p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
template <int wt>
static inline vf loadw(const void* w, int64_t k) {
    if (wt == F32) return _mm512_loadu_ps((const float*)w + k);
    if (wt == BF16)  // bf16 is fp32's upper half: widen and shift
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)w + k))), 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)w + k))));
}
template <int wt>
static inline vf loadw_part(const void* w, int64_t k, int n) {
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    if (wt == F32) return _mm512_maskz_loadu_ps(m, (const float*)w + k);
    if (wt == BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t*)w + k)), 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t*)w + k)));
}
#else
#if defined(__AVX2__) && defined(__FMA__)
#define GEMM_PATH "avx2"
typedef __m256 vf;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { v8f v; std::memcpy(&v, &a, 32); return hsum(v); }
static inline vf loadx(const float* p) { return _mm256_loadu_ps(p); }
template <int wt>
static inline vf loadw(const void* w, int64_t k) {
    if (wt == F32) return _mm256_loadu_ps((const float*)w + k);
    if (wt == BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)w + k))), 16));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)((const int8_t*)w + k))));
}
#else  // GCC vector extensions: NEON, SSE, or scalar code
#define GEMM_PATH "portable"
typedef v8f vf;
static inline vf vzero() { return (vf){0, 0, 0, 0, 0, 0, 0, 0}; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline float vsum(vf a) { return hsum(a); }
static inline vf loadx(const float* p) { vf r; std::memcpy(&r, p, 32); return r; }
template <int wt>
static inline vf loadw(const void* w, int64_t k) {
    typedef uint32_t v8u __attribute__((vector_size(32)));
    typedef uint16_t v8h __attribute__((vector_size(16)));
    typedef int8_t v8b __attribute__((vector_size(8)));
    vf r;
    if (wt == F32) {
        std::memcpy(&r, (const float*)w + k, 32);
    } else if (wt == BF16) {
        v8h h; std::memcpy(&h, (const uint16_t*)w + k, 16);
        v8u u = __builtin_convertvector(h, v8u) << 16;
        std::memcpy(&r, &u, 32);
    } else {
        v8b b; std::memcpy(&b, (const int8_t*)w + k, 8);
        r = __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
    }
    return r;
}
#endif
constexpr int VL = 8;
// the partial chunk copied into zeroed buffers, so nothing past the row's end is read
static inline vf loadx_part(const float* p, int n) {
    float b[VL] = {};
    std::memcpy(b, p, (size_t)n * 4);
    return loadx(b);
}
template <int wt>
static inline vf loadw_part(const void* w, int64_t k, int n) {
    alignas(32) char b[VL * 4] = {};
    std::memcpy(b, (const char*)w + k * wsize(wt), (size_t)n * wsize(wt));
    return loadw<wt>(b, 0);
}
#endif

// Rows m0..m0+R-1 of x (K values each) against weight rows n..n+NW-1 (stored one after another):
// R x NW accumulators in registers, each weight vector feeding R FMAs and each x vector NW.
template <int wt, int R, int NW>
static inline void gemm_block(const float* x, int64_t K, int m0, const char* w, const float* scale,
                              float* y, int64_t ldy, int64_t n, bool accumulate) {
    vf acc[R][NW];
    for (int r = 0; r < R; r++) for (int j = 0; j < NW; j++) acc[r][j] = vzero();
    const size_t wr = (size_t)K * wsize(wt);
    const float* xr = x + (size_t)m0 * K;
    const int64_t KV = K - K % VL;
    for (int64_t k = 0; k < KV; k += VL) {
        vf wv[NW];
        for (int j = 0; j < NW; j++) wv[j] = loadw<wt>(w + j * wr, k);
        for (int r = 0; r < R; r++) {
            const vf xv = loadx(xr + (size_t)r * K + k);
            for (int j = 0; j < NW; j++) acc[r][j] = vfma(wv[j], xv, acc[r][j]);
        }
    }
    if (KV < K) {
        const int t = (int)(K - KV);
        vf wv[NW];
        for (int j = 0; j < NW; j++) wv[j] = loadw_part<wt>(w + j * wr, KV, t);
        for (int r = 0; r < R; r++) {
            const vf xv = loadx_part(xr + (size_t)r * K + KV, t);
            for (int j = 0; j < NW; j++) acc[r][j] = vfma(wv[j], xv, acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NW; j++) {
            const float s = vsum(acc[r][j]) * (scale ? scale[n + j] : 1.0f);
            float* out = y + (size_t)(m0 + r) * ldy + n + j;
            *out = accumulate ? *out + s : s;
        }
}

constexpr int GEMM_R = 4, GEMM_NW = 4;  // rows x weight rows per block

template <int wt, int NW>
static inline void gemm_rows(int M, const float* x, int64_t K, const char* w, const float* scale,
                             float* y, int64_t ldy, int64_t n, bool accumulate) {
    int m = 0;
    for (; m + GEMM_R <= M; m += GEMM_R) gemm_block<wt, GEMM_R, NW>(x, K, m, w, scale, y, ldy, n, accumulate);
    switch (M - m) {
        case 3: gemm_block<wt, 3, NW>(x, K, m, w, scale, y, ldy, n, accumulate); break;
        case 2: gemm_block<wt, 2, NW>(x, K, m, w, scale, y, ldy, n, accumulate); break;
        case 1: gemm_block<wt, 1, NW>(x, K, m, w, scale, y, ldy, n, accumulate); break;
        default: break;
    }
}

// y[m*ldy + n] (=, or +=) sum_k x[m*K + k] * W[n*K + k] * scale[n] (scale null: 1), weight rows
// split across threads. Must be called inside a parallel region (it uses `omp for`).
template <int wt>
static void gemm_f(int M, const float* x, int64_t K, const void* W, const float* scale, int64_t N,
                   float* y, int64_t ldy, bool accumulate) {
    const size_t wr = (size_t)K * wsize(wt);
    const int64_t NB = (N + GEMM_NW - 1) / GEMM_NW;
    #pragma omp for schedule(static)
    for (int64_t b = 0; b < NB; b++) {
        const int64_t n = b * GEMM_NW;
        const char* w = (const char*)W + n * wr;
        switch (N - n < GEMM_NW ? N - n : GEMM_NW) {
            case 4: gemm_rows<wt, 4>(M, x, K, w, scale, y, ldy, n, accumulate); break;
            case 3: gemm_rows<wt, 3>(M, x, K, w, scale, y, ldy, n, accumulate); break;
            case 2: gemm_rows<wt, 2>(M, x, K, w, scale, y, ldy, n, accumulate); break;
            default: gemm_rows<wt, 1>(M, x, K, w, scale, y, ldy, n, accumulate); break;
        }
    }
}
