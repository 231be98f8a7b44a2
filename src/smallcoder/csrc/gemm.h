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
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include "attend.h"

enum WType { F32 = 0, BF16 = 1, I8 = 2 };

static inline size_t wsize(int wt) { return wt == F32 ? 4 : (wt == BF16 ? 2 : 1); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GEMM_PATH "avx512"
#define GEMM_VL16 1
#define GEMM_R0 8   // 8 x 3 accumulators + 3 weight vectors + 1 x vector of 32 registers
#define GEMM_NW0 3
typedef __m512 vf;
constexpr int VL = 16;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
// lanes i + (i + 8), then + (i + 4), (i + 2), (i + 1): the pairings vsum4 repeats
static inline float vsum(vf a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, 0x4E));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}
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
#define GEMM_R0 4   // 4 x 3 accumulators + 3 + 1 of 16 registers
#define GEMM_NW0 3
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
#define GEMM_R0 2   // a vector may be two registers (SSE, NEON): 2 x 2 accumulators
#define GEMM_NW0 2
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

// The horizontal sum of 4 vectors at once, by the same pairings as vsum (lanes i and i+8, then
// i and i+4, i and i+2, i and i+1): the same 4 floats, in about half the instructions.
#if GEMM_VL16
static inline void vsum4(vf a, vf b, vf c, vf d, float* out) {
    const vf ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const vf cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    const vf u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    const vf p = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
    const vf q = _mm512_add_ps(p, _mm512_permute_ps(p, 0xB1));
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                                      12, 8, 4, 0), q)));
}
#else
static inline void vsum4(vf a, vf b, vf c, vf d, float* out) {
    out[0] = vsum(a); out[1] = vsum(b); out[2] = vsum(c); out[3] = vsum(d);
}
#endif

// Rows m0..m0+R-1 of x (row stride K) against weight rows n..n+NW-1 (stored one after another),
// values k0..k1 of each: R x NW accumulators in registers, each weight vector feeding R FMAs and
// each x vector NW. A product split over k (k0 > 0 or k1 < K) keeps its accumulators, unsummed,
// in `part` between the calls: the same FMAs in the same order as one call. Each iteration
// prefetches PFL lines from pf on (weights read next), so memory streams while it computes.
template <int wt, int R, int NW, int locality, int PFL>
static inline void gemm_block(const float* x, int64_t K, int64_t k0, int64_t k1, int m0, const char* w,
                              const float* scale, float* y, int64_t ldy, int64_t n, bool accumulate, vf* part,
                              const char* pf) {
    vf acc[R][NW];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NW; j++) acc[r][j] = k0 ? part[r * NW + j] : vzero();
    const size_t wr = (size_t)K * wsize(wt);
    const float* xr = x + (size_t)m0 * K;
    const int64_t KV = k1 < K ? k1 : K - K % VL;
    for (int64_t k = k0; k < KV; k += VL) {
        // PFL lines per iteration, no branch: cheap enough to always pay
        for (int l = 0; l < PFL; l++) __builtin_prefetch(pf + 64 * l, 0, locality);
        pf += 64 * PFL;
        vf wv[NW];
        for (int j = 0; j < NW; j++) wv[j] = loadw<wt>(w + j * wr, k);
        for (int r = 0; r < R; r++) {
            const vf xv = loadx(xr + (size_t)r * K + k);
            for (int j = 0; j < NW; j++) acc[r][j] = vfma(wv[j], xv, acc[r][j]);
        }
    }
    if (k1 < K) {
        for (int r = 0; r < R; r++) for (int j = 0; j < NW; j++) part[r * NW + j] = acc[r][j];
        return;
    }
    if (KV < K) {  // the last partial chunk
        const int t = (int)(K - KV);
        vf wv[NW];
        for (int j = 0; j < NW; j++) wv[j] = loadw_part<wt>(w + j * wr, KV, t);
        for (int r = 0; r < R; r++) {
            const vf xv = loadx_part(xr + (size_t)r * K + KV, t);
            for (int j = 0; j < NW; j++) acc[r][j] = vfma(wv[j], xv, acc[r][j]);
        }
    }
    for (int j = 0; j < NW; j++) {
        float t[R + 3];
        int r = 0;
        for (; r + 4 <= R; r += 4) vsum4(acc[r][j], acc[r + 1][j], acc[r + 2][j], acc[r + 3][j], t + r);
        for (; r < R; r++) t[r] = vsum(acc[r][j]);
        const float sc = scale ? scale[n + j] : 1.0f;
        for (r = 0; r < R; r++) {
            float* out = y + (size_t)(m0 + r) * ldy + n + j;
            *out = accumulate ? *out + t[r] * sc : t[r] * sc;
        }
    }
}

#ifndef GEMM_R
#define GEMM_R GEMM_R0  // rows per register block (M > GEMM_SMALL)
#endif
#ifndef GEMM_NW
#define GEMM_NW GEMM_NW0  // weight rows per register block: GEMM_R x GEMM_NW accumulators
#endif
#ifndef GEMM_SMALL
#define GEMM_SMALL 3  // up to this many rows, one weight row at a time: bandwidth-bound
#endif
#ifndef GEMM_PF
#define GEMM_PF 4096  // bytes ahead that a one-weight-row stream prefetches (the prefetcher stops at pages)
#endif
#ifndef GEMM_KC
#define GEMM_KC 768  // values of k per pass: GEMM_R rows of them (24 KB in fp32) stay in L1
#endif
#ifndef GEMM_PANEL
#define GEMM_PANEL (192 << 10)  // bytes of weight rows per panel: they stay in L2 while every row passes
#endif
#ifndef GEMM_PF_LOC
#define GEMM_PF_LOC 2  // the panel prefetches go to L2
#endif
#ifndef GEMM_TILE
#define GEMM_TILE (512 << 10)  // bytes of x rows per tile: they stay in L2 while every panel passes
#endif
constexpr int GEMM_MAXNP = 96;  // weight rows per panel at most (the split products' accumulators)

// R (1..GEMM_R, at run time) rows from m0 against NW (1..GEMM_NW) weight rows. `stream`: the
// weights are read once (one pass), pf is NW rows ahead and each iteration prefetches NW lines
// into L1, which keeps pace with the reads; else a line per iteration into L2 (a later panel).
template <int wt, bool stream>
static inline void gemm_rows(int R, int NW, const float* x, int64_t K, int64_t k0, int64_t k1, int m0, const char* w,
                             const float* scale, float* y, int64_t ldy, int64_t n, bool accumulate, vf* part,
                             const char* pf) {
#define GEMM_CASE(r, nw) case r * 8 + nw: gemm_block<wt, r, nw, stream ? 3 : GEMM_PF_LOC, stream ? nw : 1>( \
                                              x, K, k0, k1, m0, w, scale, y, ldy, n, accumulate, part, pf); break;
#define GEMM_CASES(r) GEMM_CASE(r, 1) GEMM_CASE(r, 2) GEMM_CASE(r, 3) GEMM_CASE4(r)
#if GEMM_NW > 3
#define GEMM_CASE4(r) GEMM_CASE(r, 4)
#else
#define GEMM_CASE4(r)
#endif
    switch (R * 8 + NW) {
        GEMM_CASES(1) GEMM_CASES(2) GEMM_CASES(3) GEMM_CASES(4)
#if GEMM_R > 4
        GEMM_CASES(5) GEMM_CASES(6) GEMM_CASES(7) GEMM_CASES(8)
#endif
        default: break;
    }
#undef GEMM_CASE
#undef GEMM_CASES
#undef GEMM_CASE4
}

// One product's weights (N rows of K), their scales (null: 1) and where its outputs go
struct GemmOut {
    const void* W;
    const float* scale;
    int64_t N;
    float* y;
    int64_t ldy;
};

// The part [lo, hi) of a list of products' items (rows, or blocks of GEMM_NW rows: `per`) that
// falls in product o, as items of o: one thread's share of a list split evenly.
static inline bool gemm_share(const GemmOut* outs, int o, int64_t per, int64_t& lo, int64_t& hi) {
    int64_t base = 0;
    for (int i = 0; i < o; i++) base += (outs[i].N + per - 1) / per;
    const int64_t n = (outs[o].N + per - 1) / per;
    const int64_t a = lo > base ? lo - base : 0, b = hi - base < n ? hi - base : n;
    if (a >= b) return false;
    lo = a, hi = b;
    return true;
}

// For each product o: y_o[m*ldy + n] (=, or +=) sum_k x[m*K + k] * W_o[n*K + k] * scale_o[n], all
// of one x (the q, k and v products of a layer; gate and up): one split of their weight rows
// across threads, evenly, and one barrier for all. Must be called inside a parallel region.
template <int wt>
static void gemm_f(int M, const float* x, int64_t K, const GemmOut* outs, int n_outs, bool accumulate) {
    const size_t wr = (size_t)K * wsize(wt);
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t per = M <= GEMM_SMALL ? 1 : GEMM_NW;
    int64_t items = 0;
    for (int o = 0; o < n_outs; o++) items += (outs[o].N + per - 1) / per;
    const int64_t mine0 = items * tid / nth, mine1 = items * (tid + 1) / nth;
    if (M <= GEMM_SMALL) {  // few FMAs per weight: one sequential stream, prefetched ahead into L1
        for (int o = 0; o < n_outs; o++) {
            int64_t n0 = mine0, n1 = mine1;
            if (!gemm_share(outs, o, 1, n0, n1)) continue;
            const GemmOut& g = outs[o];
            for (int64_t n = n0; n < n1; n++) {
                const char* w = (const char*)g.W + n * wr;
                gemm_rows<wt, true>(M, 1, x, K, 0, K, 0, w, g.scale, g.y, g.ldy, n, accumulate, nullptr, w + GEMM_PF);
            }
        }
        #pragma omp barrier
        return;
    }
    // The blocking of a GEMM: a tile of x rows stays in L2 while every panel of weight rows
    // passes; within a panel (in L2), GEMM_R rows' GEMM_KC values stay in L1 while the panel's
    // blocks of GEMM_NW weight rows pass them, each block's loop prefetching the next panel into
    // L2 a line at a time. So weights come from memory once per tile, x from L1 nearly always.
    int64_t NPB = (int64_t)(GEMM_PANEL / wr) / GEMM_NW;  // blocks per panel
    NPB = NPB < 1 ? 1 : (NPB > GEMM_MAXNP / GEMM_NW ? GEMM_MAXNP / GEMM_NW : NPB);
    // split k only where it pays: rows reused across blocks, beyond L1
    const int64_t KC = M > GEMM_R && K > GEMM_KC + GEMM_KC / 2 ? GEMM_KC : K;
    int64_t MT = GEMM_TILE / (K * 4) / GEMM_R * GEMM_R;
    MT = MT < GEMM_R ? GEMM_R : MT;
    alignas(64) vf part[GEMM_R * GEMM_MAXNP];
    for (int64_t t0 = 0; t0 < M; t0 += MT) {
        const int mt = (int)(M - t0 < MT ? M - t0 : MT);
        const int passes = (mt + GEMM_R - 1) / GEMM_R;
        for (int o = 0; o < n_outs; o++) {
            int64_t b0 = mine0, b1 = mine1;
            if (!gemm_share(outs, o, GEMM_NW, b0, b1)) continue;
            const GemmOut& g = outs[o];
            for (int64_t pb = b0; pb < b1; pb += NPB) {
                const int64_t blocks = b1 - pb < NPB ? b1 - pb : NPB;
                // the next panel, a line per iteration from its start (the rest to the hardware)
                const char* pf = (const char*)g.W + (pb + NPB) * GEMM_NW * wr;
                const char* const pf_end = pf + NPB * GEMM_NW * wr;
                for (int i = 0; i < passes; i++) {
                    const int m0 = (int)t0 + i * GEMM_R, r = mt - i * GEMM_R < GEMM_R ? mt - i * GEMM_R : GEMM_R;
                    for (int64_t k0 = 0; k0 < K; k0 += KC) {
                        const int64_t k1 = K - k0 < KC ? K : k0 + KC;
                        for (int64_t b = 0; b < blocks; b++) {
                            const int64_t n = (pb + b) * GEMM_NW;
                            const int nw = (int)(g.N - n < GEMM_NW ? g.N - n : GEMM_NW);
                            const char* w = (const char*)g.W + n * wr;
                            if (passes == 1)
                                gemm_rows<wt, true>(r, nw, x, K, k0, k1, m0, w, g.scale, g.y, g.ldy, n, accumulate,
                                                    part, w + GEMM_NW * wr);
                            else
                                gemm_rows<wt, false>(r, nw, x, K, k0, k1, m0, w, g.scale, g.y, g.ldy, n, accumulate,
                                                     part + b * GEMM_NW * GEMM_R, pf < pf_end ? pf : w);
                            pf += (k1 - k0) / VL * 64;
                        }
                    }
                }
            }
        }
    }
    #pragma omp barrier
}

// One product (a convenience of the above)
template <int wt>
static void gemm_f(int M, const float* x, int64_t K, const void* W, const float* scale, int64_t N,
                   float* y, int64_t ldy, bool accumulate) {
    const GemmOut g{W, scale, N, y, ldy};
    gemm_f<wt>(M, x, K, &g, 1, accumulate);
}
