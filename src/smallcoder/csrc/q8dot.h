// int8 weights x int8 activations for the decode step (included by decode.cpp).
//
// Why: widening every int8 weight to fp32 before an FMA costs three instructions per 16 weights
// and per row, which bounded a step of several rows (a 16-token prefill chunk: 100 -> 68 ms at
// 303M). As llama.cpp does for q8_0, each activation row is quantized on the fly to int8 in
// blocks of 32 (scale = max|x| / 127, round to nearest even), and
// a weight row's dot product is an integer dot product per block (exact in int32: 32 x 127 x 127
// < 2^31), times the block's activation scale, summed in fp32, times the row's fp32 weight scale
// (quant.py: one scale per output row; its weights lie in [-127, 127], which the AVX2 sign trick
// below relies on). The activations are quantized once per matmul input, not once per weight row.
//
// A row's result depends only on that row: every path below runs the same per-row sequence of
// operations whatever M is, so a token's logits do not depend on the rows it ran with (the engine
// relies on it: a position is computed alike in a prefill chunk and in a decode step).
//
// The instruction path is chosen at compile time from what -march=native defines:
//   AVX512-VNNI: 64 bytes at a time, vpdpbusd (u8 x s8 -> s32) on w + 128 (one xor per weight
//                vector, shared by every row) and x, started from -128 * (x's 4-byte sums),
//                which the quantizer stores: per row and 64 bytes, one load-fused vpdpbusd, a
//                convert and an FMA (the sign trick, |x| x sign-adjusted w, costs two more);
//   AVX-VNNI:    the same on 256 bits;
//   AVX2:        vpsignb + vpmaddubsw + vpmaddwd on |x| and w carrying x's sign (the u8 x s8 pairs
//                cannot saturate: both <= 127; w + 128 would, so no offset trick here);
//   otherwise:   plain loops, which GCC vectorizes for the target (NEON, SSE).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

constexpr int Q8_BLOCK = 32;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q8_VNNI 1
#define Q8_PATH "avx512-vnni"
constexpr int Q8_CHUNK = 64;   // bytes per step of the dot loop
constexpr int Q8_SLANES = 8;   // each block's scale stored 8 times: one 16-lane load covers 2 blocks
#elif defined(__AVXVNNI__) || defined(__AVX2__)
#ifdef __AVXVNNI__
#define Q8_VNNI 1
#define Q8_PATH "avx-vnni"
#else
#define Q8_PATH "avx2"
#endif
constexpr int Q8_CHUNK = 32;
constexpr int Q8_SLANES = 1;
#else
#define Q8_PATH "portable"
constexpr int Q8_CHUNK = 32;
constexpr int Q8_SLANES = 1;
#endif

// M activation rows of K values, quantized: row m's values at q + m * KP (zero from K to KP),
// block b's scale at s[m * SP + b * Q8_SLANES ...], and at aux + m * KP what the path's dot
// product needs besides: with VNNI, int32 -128 * (sum of each 4 values); else their |values|.
struct Q8Rows {
    int8_t* q;
    uint8_t* aux;
    float* s;
    int64_t K, KP, SP;
};

static inline int64_t q8_padded(int64_t K) { return (K + Q8_CHUNK - 1) / Q8_CHUNK * Q8_CHUNK; }

// The buffers (sized for the widest input) seen as rows of K values.
static inline Q8Rows q8_view(int8_t* q, uint8_t* aux, float* s, int64_t K) {
    const int64_t KP = q8_padded(K);
    return Q8Rows{q, aux, s, K, KP, KP / Q8_BLOCK * Q8_SLANES};
}

static inline int64_t q8_blocks(const Q8Rows& X) { return X.KP / Q8_BLOCK; }

// Quantize block b of row m from x (the row's K values); blocks past K (padding up to KP) become
// zeros, so a buffer reused for another K never leaves stale values in a dot product.
static inline void q8_block(const float* x, Q8Rows& X, int m, int64_t b) {
    const int64_t k0 = b * Q8_BLOCK;
    const int n = (int)(X.K - k0 < Q8_BLOCK ? (X.K - k0 > 0 ? X.K - k0 : 0) : Q8_BLOCK);
    float amax = 0;
    for (int i = 0; i < n; i++) amax = std::fmax(amax, std::fabs(x[k0 + i]));
    const float d = amax / 127.0f;
    const float id = amax > 0 ? 127.0f / amax : 0.0f;
    int8_t* q = X.q + (size_t)m * X.KP + k0;
    for (int i = 0; i < n; i++) {
        // nearbyint rounds half to even (the default mode), as torch.round does in the tests
        float r = std::nearbyint(x[k0 + i] * id);
        q[i] = (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
    }
    for (int i = n; i < Q8_BLOCK; i++) q[i] = 0;
    uint8_t* aux = X.aux + (size_t)m * X.KP + k0;
#ifdef Q8_VNNI
    for (int j = 0; j < Q8_BLOCK / 4; j++) {
        const int32_t c = -128 * ((int32_t)q[4 * j] + q[4 * j + 1] + q[4 * j + 2] + q[4 * j + 3]);
        std::memcpy(aux + 4 * j, &c, 4);
    }
#else
    for (int i = 0; i < Q8_BLOCK; i++) aux[i] = (uint8_t)(q[i] < 0 ? -q[i] : q[i]);
#endif
    for (int j = 0; j < Q8_SLANES; j++) X.s[(size_t)m * X.SP + b * Q8_SLANES + j] = d;
}

#ifndef Q8_PREFETCH
#define Q8_PREFETCH 4096
#endif
// Ask for the weights Q8_PREFETCH bytes ahead (one call per 64-byte line): the hardware prefetcher
// stops at each 4 KiB page, and without this a one-row step waited on memory there (measured at
// 303M on 2 cores: 21 -> 14 ms; it, more than the integer arithmetic, is what a one-row step
// gains). Prefetching never faults, so reading past the matrix is harmless.
static inline void q8_prefetch(const int8_t* p) { __builtin_prefetch(p + Q8_PREFETCH, 0, 3); }

static inline void q8_store(float* out, float t, float sc, bool accumulate) {
    *out = accumulate ? *out + t * sc : t * sc;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q8_PAIRS 1
// Rows m0..m0+R-1 against weight rows n..n+NW-1 (stored one after another): each 64-byte weight
// load feeds R rows and each activation load NW weight rows, which gives the out-of-order core
// independent chains; each (row, weight row) keeps one fp32 accumulator, in the same order
// whatever R and NW are.
template <int R, int NW = 1>
static inline void q8_dot(const Q8Rows& X, int m0, const int8_t* w, const float* sc, float* y, int64_t ldy,
                          int64_t n, bool accumulate) {
    __m512 acc[R][NW];
    for (int r = 0; r < R; r++) for (int j = 0; j < NW; j++) acc[r][j] = _mm512_setzero_ps();
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    const int64_t K = X.K;
    auto step = [&](int64_t k, const __m512i* wv) {
        __m512i wu[NW];
        for (int j = 0; j < NW; j++) wu[j] = _mm512_xor_si512(wv[j], offset);  // w + 128: vpdpbusd's unsigned operand
        for (int r = 0; r < R; r++) {
            const size_t o = (size_t)(m0 + r) * X.KP + k;
            const __m512i xq = _mm512_loadu_si512(X.q + o), corr = _mm512_loadu_si512(X.aux + o);
            // lanes 0-7 hold block k/32's sums, lanes 8-15 the next block's: scales stored to match
            const __m512 s = _mm512_loadu_ps(X.s + (size_t)(m0 + r) * X.SP + k / Q8_BLOCK * Q8_SLANES);
            for (int j = 0; j < NW; j++) {
                // sum (w + 128) x - 128 sum x = sum w x, exact in each int32 lane
                const __m512i d = _mm512_dpbusd_epi32(corr, wu[j], xq);
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[r][j]);
            }
        }
    };
    __m512i wv[NW];
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        for (int j = 0; j < NW; j++) {
            q8_prefetch(w + j * K + k);
            wv[j] = _mm512_loadu_si512(w + j * K + k);
        }
        step(k, wv);
    }
    if (k < K) {  // the row's last partial chunk: a masked load never reads past the row's end
        for (int j = 0; j < NW; j++) wv[j] = _mm512_maskz_loadu_epi8(~0ULL >> (64 - (K - k)), w + j * K + k);
        step(k, wv);
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < NW; j++)
            q8_store(y + (size_t)(m0 + r) * ldy + n + j, _mm512_reduce_add_ps(acc[r][j]), sc[j], accumulate);
}
#elif defined(__AVXVNNI__) || defined(__AVX2__)
static inline float q8_hsum(__m256 v) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

template <int R>
static inline void q8_dot(const Q8Rows& X, int m0, const int8_t* w, const float* sc, float* y, int64_t ldy,
                          int64_t n, bool accumulate) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
#ifdef Q8_VNNI
    const __m256i offset = _mm256_set1_epi8((char)0x80);
#else
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    auto step = [&](int64_t k, __m256i wv) {
#ifdef Q8_VNNI
        const __m256i wu = _mm256_xor_si256(wv, offset);
#endif
        for (int r = 0; r < R; r++) {
            const size_t o = (size_t)(m0 + r) * X.KP + k;
            const __m256i xq = _mm256_loadu_si256((const __m256i*)(X.q + o));
            const __m256i aux = _mm256_loadu_si256((const __m256i*)(X.aux + o));
#ifdef Q8_VNNI
            const __m256i d = _mm256_dpbusd_avx_epi32(aux, wu, xq);
#else
            const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(aux, _mm256_sign_epi8(wv, xq)), ones);
#endif
            const __m256 s = _mm256_broadcast_ss(X.s + (size_t)(m0 + r) * X.SP + k / Q8_BLOCK);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[r]);
        }
    };
    const int64_t K = X.K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if (k % 64 == 0) q8_prefetch(w + k);
        step(k, _mm256_loadu_si256((const __m256i*)(w + k)));
    }
    if (k < K) {  // the row's last partial block, copied so no byte past the row's end is read
        alignas(32) int8_t tail[32] = {};
        std::memcpy(tail, w + k, (size_t)(K - k));
        step(k, _mm256_load_si256((const __m256i*)tail));
    }
    for (int r = 0; r < R; r++) q8_store(y + (size_t)(m0 + r) * ldy + n, q8_hsum(acc[r]), *sc, accumulate);
}
#else
template <int R>
static inline void q8_dot(const Q8Rows& X, int m0, const int8_t* w, const float* sc, float* y, int64_t ldy,
                          int64_t n, bool accumulate) {
    for (int r = 0; r < R; r++) {
        const int8_t* q = X.q + (size_t)(m0 + r) * X.KP;
        const float* s = X.s + (size_t)(m0 + r) * X.SP;
        float t = 0;
        for (int64_t k0 = 0; k0 < X.K; k0 += Q8_BLOCK) {
            if (r == 0 && k0 % 64 == 0) q8_prefetch(w + k0);
            const int64_t k1 = k0 + Q8_BLOCK < X.K ? k0 + Q8_BLOCK : X.K;
            int32_t isum = 0;
            for (int64_t k = k0; k < k1; k++) isum += (int32_t)q[k] * (int32_t)w[k];
            t += (float)isum * s[k0 / Q8_BLOCK];
        }
        q8_store(y + (size_t)(m0 + r) * ldy + n, t, *sc, accumulate);
    }
}
#endif

// y[m*ldy + n] (=, or +=) dot(x row m, W row n) * scale[n] for the quantized rows X; weight rows
// split across threads. Must be called inside a parallel region (it uses `omp for`).
template <int... NW>
static inline void q8_rows(int M, const Q8Rows& X, const int8_t* w, const float* sc, float* y, int64_t ldy,
                           int64_t n, bool accumulate) {
    int m = 0;
    for (; m + 4 <= M; m += 4) q8_dot<4, NW...>(X, m, w, sc, y, ldy, n, accumulate);
    switch (M - m) {
        case 3: q8_dot<3, NW...>(X, m, w, sc, y, ldy, n, accumulate); break;
        case 2: q8_dot<2, NW...>(X, m, w, sc, y, ldy, n, accumulate); break;
        case 1: q8_dot<1, NW...>(X, m, w, sc, y, ldy, n, accumulate); break;
        default: break;
    }
}

static void gemv_q8(int M, const Q8Rows& X, const int8_t* W, const float* scale, int64_t N, float* y,
                    int64_t ldy, bool accumulate) {
    const int64_t K = X.K;
#ifdef Q8_PAIRS
    if (M >= 4) {  // weight rows in pairs: halves the activation reads, which spill out of L1 here
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n += 2) {
            if (n + 1 < N) q8_rows<2>(M, X, W + (size_t)n * K, scale + n, y, ldy, n, accumulate);
            else q8_rows<1>(M, X, W + (size_t)n * K, scale + n, y, ldy, n, accumulate);
        }
        return;
    }
#endif
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) q8_rows<>(M, X, W + (size_t)n * K, scale + n, y, ldy, n, accumulate);
}
