// Many rows (a prefill) against int8 weights with 512-bit vectors: an outer-product GEMM
// (included by q8dot.h, whose quantized rows, Q8Rows, it reads).
//
// Why: q8dot.h's tiles take dot products along K, each (row, weight row) in a vector accumulator
// reduced at the end, and reload every activation row from L2 for each group of weight rows:
// measured ~65 GMAC/s a core at 512 rows against ~106 with everything in L1. Here 64 weight rows
// at a time are widened into a panel of int16 pairs, (w[n][k], w[n][k + 1]) for 16 n a vector, and
// each row's pair (x[k], x[k + 1]), broadcast, meets 4 such vectors: 6 rows x 64 weight rows are 24
// accumulators of 16 outputs, no reduction, and a row is read 4 bytes at a time. The panel holds
// Q8G_KC values of K (its int32 sums wait in a per-thread buffer between blocks of K).
//
// A row's result is q8dot.h's, bit for bit: the same exact int32 sum, in another order, and the
// same fp32 epilogue lane by lane (q8g_store is q8_store on 16 lanes).
#pragma once
#if defined(Q8_512)
#define Q8_GEMM 1
#include <new>

constexpr int Q8G_NP = 64;   // weight rows per panel: 4 vectors of 16
#ifndef Q8G_KC
#define Q8G_KC 256           // values of K per panel (32 KB of int16 pairs: L1)
#endif
#ifndef Q8G_MIN_ROWS
#define Q8G_MIN_ROWS 48      // fewer rows take q8dot.h's tiles (the panel's widening would not pay)
#endif

// 16 vectors of 16 int32 transposed in place: r[i] lane j <- r[j] lane i
static inline void q8g_transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    // lane L of r[4i + c]: rows 4i..4i+3 of column 4L + c; a 4 x 4 transpose of lanes finishes
    for (int c = 0; c < 4; c++) {
        const __m512i a = r[c], b = r[4 + c], d = r[8 + c], e = r[12 + c];
        const __m512i ab0 = _mm512_shuffle_i32x4(a, b, 0x88), ab1 = _mm512_shuffle_i32x4(a, b, 0xdd);
        const __m512i de0 = _mm512_shuffle_i32x4(d, e, 0x88), de1 = _mm512_shuffle_i32x4(d, e, 0xdd);
        t[c] = _mm512_shuffle_i32x4(ab0, de0, 0x88);
        t[8 + c] = _mm512_shuffle_i32x4(ab0, de0, 0xdd);
        t[4 + c] = _mm512_shuffle_i32x4(ab1, de1, 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(ab1, de1, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

// Weight rows n0..n0+np-1 (np <= 64; the rest zero), values k0..k0+kc-1 (zero past K), as P:
// for each pair p, 64 int32 lanes (w[n][k0 + 2p], w[n][k0 + 2p + 1]) for n = n0.. (16 a vector)
static inline void q8g_pack(const int8_t* W, int64_t K, int64_t n0, int np, int64_t k0, int kc, int32_t* P) {
    for (int v = 0; v < Q8G_NP / 16; v++)
        for (int k = 0; k < kc; k += 32) {  // 16 weight rows x 32 values: 16 vectors of 16 pairs
            __m512i r[16];
            const int64_t left = K - (k0 + k);
            for (int i = 0; i < 16; i++) {
                const int n = v * 16 + i;
                if (n >= np || left <= 0) { r[i] = _mm512_setzero_si512(); continue; }
                const int8_t* p = W + (size_t)(n0 + n) * K + k0 + k;
                r[i] = left >= 32 ? _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p))
                                  : _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8((__mmask32)((1ULL << left) - 1), p));
            }
            q8g_transpose16(r);  // r[p] = pair k/2 + p of the 16 weight rows
            for (int p = 0; p < 16; p++) _mm512_store_si512(P + (size_t)(k / 2 + p) * Q8G_NP + v * 16, r[p]);
        }
}

// Rows m0..m0+R-1 (x at X.q, values k0..) against the panel's `pairs` pairs: C (R rows of 64
// int32 sums) += (or =, `first`) their products
template <int R>
static inline void q8g_tile(const Q8Rows& X, int m0, int64_t k0, int pairs, const int32_t* P, int32_t* C,
                            bool first) {
    __m512i acc[R][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++)
            acc[r][v] = first ? _mm512_setzero_si512() : _mm512_load_si512(C + r * Q8G_NP + 16 * v);
    const int16_t* x = X.q + (size_t)m0 * X.KP + k0;
    for (int p = 0; p < pairs; p++) {
#ifndef Q8G_NOPF
        if (p % 16 == 0)  // the next row block's values, a line a row (their streams are too short to be guessed)
            for (int r = 0; r < R; r++) __builtin_prefetch(x + (size_t)(R + r) * X.KP + 2 * p, 0, 3);
        if (p % 8 == 0) __builtin_prefetch(C + R * Q8G_NP + p / 8 * 16, 1, 3);  // and its sums
#endif
        __m512i w[4];
        for (int v = 0; v < 4; v++) w[v] = _mm512_load_si512(P + (size_t)p * Q8G_NP + 16 * v);
        for (int r = 0; r < R; r++) {
            int32_t xp;
            std::memcpy(&xp, x + (size_t)r * X.KP + 2 * p, 4);
            const __m512i xb = _mm512_set1_epi32(xp);
            for (int v = 0; v < 4; v++) acc[r][v] = q8_dp(acc[r][v], xb, w[v]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < 4; v++) _mm512_store_si512(C + r * Q8G_NP + 16 * v, acc[r][v]);
}

// q8_store on 16 lanes (n of them written)
static inline void q8g_store(float* out, __m512i sums, float d, const float* sc, int n, bool accumulate) {
    const __mmask16 k = (__mmask16)((1u << n) - 1);
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(d)), s = _mm512_maskz_loadu_ps(k, sc);
    _mm512_mask_storeu_ps(out, k, accumulate ? _mm512_fmadd_ps(t, s, _mm512_maskz_loadu_ps(k, out)) : _mm512_mul_ps(t, s));
}

// gemv_q8 for M >= Q8G_MIN_ROWS rows: panels of 64 weight rows split across threads. Must be
// called inside a parallel region.
static void gemm_q8(int M, const Q8Rows& X, const int8_t* W, const float* scale, int64_t N, float* y, int64_t ldy,
                    bool accumulate) {
    const int64_t K = X.K, panels = (N + Q8G_NP - 1) / Q8G_NP;
    static thread_local int32_t* buf = nullptr;  // the panel, then M rows of 64 sums
    static thread_local int64_t cap = 0;
    const int64_t need = (int64_t)Q8G_KC / 2 * Q8G_NP + (int64_t)M * Q8G_NP;
    if (cap < need) {
        ::operator delete[](buf, std::align_val_t(64));
        cap = need;
        buf = (int32_t*)::operator new[](cap * 4, std::align_val_t(64));
    }
    int32_t* P = buf;
    int32_t* C = buf + Q8G_KC / 2 * Q8G_NP;
    #pragma omp for schedule(static)
    for (int64_t pn = 0; pn < panels; pn++) {
        const int64_t n0 = pn * Q8G_NP;
        const int np = N - n0 < Q8G_NP ? (int)(N - n0) : Q8G_NP;
        for (int64_t k0 = 0; k0 < K; k0 += Q8G_KC) {
            const int kc = K - k0 < Q8G_KC ? (int)((K - k0 + 31) / 32 * 32) : Q8G_KC;
            q8g_pack(W, K, n0, np, k0, kc, P);
            for (int m = 0; m < M; m += 6) {
                int32_t* c = C + (size_t)m * Q8G_NP;
                switch (M - m < 6 ? M - m : 6) {
                    case 6: q8g_tile<6>(X, m, k0, kc / 2, P, c, k0 == 0); break;
                    case 5: q8g_tile<5>(X, m, k0, kc / 2, P, c, k0 == 0); break;
                    case 4: q8g_tile<4>(X, m, k0, kc / 2, P, c, k0 == 0); break;
                    case 3: q8g_tile<3>(X, m, k0, kc / 2, P, c, k0 == 0); break;
                    case 2: q8g_tile<2>(X, m, k0, kc / 2, P, c, k0 == 0); break;
                    default: q8g_tile<1>(X, m, k0, kc / 2, P, c, k0 == 0); break;
                }
            }
        }
        for (int m = 0; m < M; m++)
            for (int v = 0; v < 4 && 16 * v < np; v++)
                q8g_store(y + (size_t)m * ldy + n0 + 16 * v, _mm512_load_si512(C + (size_t)m * Q8G_NP + 16 * v),
                          X.s[m], scale + n0 + 16 * v, np - 16 * v < 16 ? np - 16 * v : 16, accumulate);
    }
}
#endif
