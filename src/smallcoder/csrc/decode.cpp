// One decode step of a Llama-style model for a few rows: the whole token in one OpenMP parallel
// region, so no per-op dispatch and every thread streams weights at once. Any row count M works;
// kernels.py hands it at most MAX_ROWS (16) rows, the range where it measured faster than PyTorch.
//
// Why: at batch 1 a decode step reads every weight once and does 2 FLOPs per weight, so it is
// bound by memory bandwidth. PyTorch's one-row matmul runs on one thread at ~40% of the bandwidth
// here and each small op costs microseconds of dispatch; this loop keeps every core streaming.
// Weights are fp32, bf16, or int8 with one fp32 scale per output row. With fp32/bf16 weights the
// activations and all accumulation are fp32; int8 weights meet int16 activations (q8dot.h: each
// row quantized on the fly with one scale, integer dot products). RMSNorm, RoPE, attention, softmax, the KV
// cache and the residual stream are fp32 in every case. Plain C++ with GCC vector extensions:
// -march=native picks AVX2, AVX-512 or NEON. The arithmetic follows model.py (fp32 RMSNorm,
// rotate-half RoPE, softmax). Defining SC_INT8_WIDEN builds the former int8 path (each weight
// widened to fp32), kept only so benchmarks/kernel_step.py can compare the two.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>
#if defined(__AVX2__) || defined(__SSE__)
#include <immintrin.h>
#endif
#include "attend.h"
#include "q8dot.h"

typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));
typedef uint16_t v8h __attribute__((vector_size(16)));

enum WType { F32 = 0, BF16 = 1, I8 = 2 };

template <int wt>
static inline v8f load8(const void* w, int64_t k) {
#ifdef __AVX2__  // GCC scalarizes the generic int8/bf16 widening below; these are one instruction each
    if (wt == I8) {
        __m256 r = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)((const int8_t*)w + k))));
        return (v8f)r;
    }
    if (wt == BF16) {
        __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)w + k))), 16);
        return (v8f)_mm256_castsi256_ps(u);
    }
#endif
    if (wt == F32) {
        v8f r; std::memcpy(&r, (const float*)w + k, 32); return r;
    } else if (wt == BF16) {
        v8h h; std::memcpy(&h, (const uint16_t*)w + k, 16);
        v8u u = __builtin_convertvector(h, v8u) << 16;
        v8f r; std::memcpy(&r, &u, 32); return r;
    } else {
        v8b b; std::memcpy(&b, (const int8_t*)w + k, 8);
        return __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
    }
}

static inline float loadw(const void* w, int64_t k, int wt) {
    if (wt == F32) return ((const float*)w)[k];
    if (wt == BF16) { uint32_t u = (uint32_t)((const uint16_t*)w)[k] << 16; float f; std::memcpy(&f, &u, 4); return f; }
    return (float)((const int8_t*)w)[k];
}

static inline size_t wsize(int wt) { return wt == F32 ? 4 : (wt == BF16 ? 2 : 1); }

// y[m*ldy + n] (=, or +=) sum_k x[m*K + k] * W[n*K + k] * scale[n], rows n split across threads.
// One weight row at a time (one sequential stream, which the prefetcher follows: four rows at a
// time measured 2-3x slower), with U independent accumulators per x row so the FMA latency is
// hidden. The x rows are taken MB at a time, all against the same weight row, so each weight
// comes from memory once and later blocks read it from L1.
template <int wt, int MB>
static inline void dot_rows(int M0, const float* x, int64_t K, const char* wr, float sc,
                            float* y, int64_t ldy, int64_t n, bool accumulate) {
    constexpr int U = MB >= 4 ? 1 : 4 / MB;
    const int64_t KU = K - K % (8 * U), K8 = K & ~int64_t(7);
    v8f acc[MB][U];
    for (int m = 0; m < MB; m++) for (int u = 0; u < U; u++) acc[m][u] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k < KU; k += 8 * U) {
        for (int u = 0; u < U; u++) {
            const v8f w = load8<wt>(wr, k + 8 * u);
            for (int m = 0; m < MB; m++) {
                v8f xv; std::memcpy(&xv, x + (size_t)(M0 + m) * K + k + 8 * u, 32);
                acc[m][u] += w * xv;
            }
        }
    }
    for (; k < K8; k += 8) {
        const v8f w = load8<wt>(wr, k);
        for (int m = 0; m < MB; m++) {
            v8f xv; std::memcpy(&xv, x + (size_t)(M0 + m) * K + k, 32);
            acc[m][0] += w * xv;
        }
    }
    for (int m = 0; m < MB; m++) {
        v8f a = acc[m][0];
        for (int u = 1; u < U; u++) a += acc[m][u];
        float t = hsum(a);
        for (int64_t kk = K8; kk < K; kk++) t += loadw(wr, kk, wt) * x[(size_t)(M0 + m) * K + kk];
        float* out = y + (size_t)(M0 + m) * ldy + n;
        *out = accumulate ? *out + t * sc : t * sc;
    }
}

#if defined(__AVX512F__) && defined(SC_INT8_WIDEN)
// One int8 weight row against one x row with 512-bit vectors: the int8 -> fp32 widening, not the
// memory, bounds a one-row int8 step on CPUs with AVX-512, and 16 lanes halve its instructions.
static inline void dot_row_i8_512(const float* x, int64_t K, const int8_t* wr, float sc, float* out,
                                  bool accumulate) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k)))),
                             _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k + 16)))),
                             _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k + 32)))),
                             _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k + 48)))),
                             _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16)
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr + k)))),
                             _mm512_loadu_ps(x + k), a0);
    float t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < K; k++) t += (float)wr[k] * x[k];
    *out = accumulate ? *out + t * sc : t * sc;
}
#endif

// A 2 (weight rows) x 4 (x rows) register block: each weight vector feeds four FMAs and each x
// vector two, so for batches of 4+ rows the loop is bound by FMAs, not by loads and conversions.
template <int wt>
static inline void block_2x4(int M0, const float* x, int64_t K, const char* w0, const char* w1,
                             float s0, float s1, float* y, int64_t ldy, int64_t n, bool accumulate) {
    v8f a[2][4];
    for (int j = 0; j < 2; j++) for (int m = 0; m < 4; m++) a[j][m] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t K8 = K & ~int64_t(7);
    const float* xr[4];
    for (int m = 0; m < 4; m++) xr[m] = x + (size_t)(M0 + m) * K;
    for (int64_t k = 0; k < K8; k += 8) {
        const v8f u = load8<wt>(w0, k), v = load8<wt>(w1, k);
        for (int m = 0; m < 4; m++) {
            v8f xv; std::memcpy(&xv, xr[m] + k, 32);
            a[0][m] += u * xv;
            a[1][m] += v * xv;
        }
    }
    for (int j = 0; j < 2; j++) {
        const char* wr = j ? w1 : w0;
        const float sc = j ? s1 : s0;
        for (int m = 0; m < 4; m++) {
            float t = hsum(a[j][m]);
            for (int64_t kk = K8; kk < K; kk++) t += loadw(wr, kk, wt) * xr[m][kk];
            float* out = y + (size_t)(M0 + m) * ldy + n + j;
            *out = accumulate ? *out + t * sc : t * sc;
        }
    }
}

// Must be called inside a parallel region (it uses `omp for`).
template <int wt>
static void gemv_t(int M, const float* x, int64_t K, const void* W, const float* scale,
                   int64_t N, float* y, int64_t ldy, bool accumulate) {
    const size_t es = wsize(wt);
    if (M >= 4) {
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n += 2) {
            const char* w0 = (const char*)W + (size_t)n * K * es;
            const float s0 = scale ? scale[n] : 1.0f;
            if (n + 1 < N) {
                const char* w1 = w0 + (size_t)K * es;
                const float s1 = scale ? scale[n + 1] : 1.0f;
                int m = 0;
                for (; m + 4 <= M; m += 4) block_2x4<wt>(m, x, K, w0, w1, s0, s1, y, ldy, n, accumulate);
                for (; m < M; m++) {
                    dot_rows<wt, 1>(m, x, K, w0, s0, y, ldy, n, accumulate);
                    dot_rows<wt, 1>(m, x, K, w1, s1, y, ldy, n + 1, accumulate);
                }
            } else {
                for (int m = 0; m < M; m++) dot_rows<wt, 1>(m, x, K, w0, s0, y, ldy, n, accumulate);
            }
        }
        return;
    }
#if defined(__AVX512F__) && defined(SC_INT8_WIDEN)
    if (wt == I8 && M == 1) {
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            dot_row_i8_512(x, K, (const int8_t*)W + (size_t)n * K, scale ? scale[n] : 1.0f, y + n, accumulate);
        return;
    }
#endif
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const char* wr = (const char*)W + (size_t)n * K * es;
        const float sc = scale ? scale[n] : 1.0f;
        int m = 0;
        for (; m + 2 <= M; m += 2) dot_rows<wt, 2>(m, x, K, wr, sc, y, ldy, n, accumulate);
        for (; m < M; m++) dot_rows<wt, 1>(m, x, K, wr, sc, y, ldy, n, accumulate);
    }
}

#ifdef SC_INT8_WIDEN
constexpr bool Q8 = false;
#else
constexpr bool Q8 = true;  // int8 weights take q8dot.h's integer path
#endif

// x (M x K, fp32) times W: with int8 weights (Q8) the product reads xq, x already quantized.
static void gemv(int M, const float* x, const Q8Rows& xq, int64_t K, const void* W, const float* scale,
                 int wt, int64_t N, float* y, int64_t ldy, bool accumulate) {
    if (wt == F32) gemv_t<F32>(M, x, K, W, scale, N, y, ldy, accumulate);
    else if (wt == BF16) gemv_t<BF16>(M, x, K, W, scale, N, y, ldy, accumulate);
    else if (Q8) gemv_q8(M, xq, (const int8_t*)W, scale, N, y, ldy, accumulate);
    else gemv_t<I8>(M, x, K, W, scale, N, y, ldy, accumulate);
}

// out = RMSNorm(x) per row; with xq, also quantized for the int8 products that read it (in the
// same loop, so no extra barrier)
static void rmsnorm_rows(int M, const float* x, const float* w, int64_t H, float eps, float* out, Q8Rows* xq) {
    #pragma omp for schedule(static)
    for (int m = 0; m < M; m++) {
        const float* xr = x + (size_t)m * H;
        float ss = 0;
        for (int64_t i = 0; i < H; i++) ss += xr[i] * xr[i];
        const float r = 1.0f / std::sqrt(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) out[(size_t)m * H + i] = w[i] * (xr[i] * r);
        if (xq) q8_row(out + (size_t)m * H, *xq, m);
    }
}

// Per layer, 13 pointers: input_norm, q, k, v, o, post_norm, gate, up, down weights, then the
// layer's K and V caches (fp32, fp16 or int8: kv_type) and, for int8, their row scales (else 0).
// Weight scales (int8 weights only), per layer: q, k, v, o, gate, up, down (7).
// Head: final norm, lm_head weight, lm_head scale.
extern "C" int sc_decode(
    int M, int n_threads, const float* x_in, const int64_t* pos,
    const int64_t* layer_ptrs, const int64_t* scale_ptrs, const int64_t* head_ptrs,
    int L, int H, int NH, int NKV, int HD, int FF, int V, int64_t cache_row_stride, int64_t cache_len,
    int wt, int kv_type, float eps, const float* inv_freq, int head_from, float* logits) {
    const int64_t QD = (int64_t)NH * HD, KD = (int64_t)NKV * HD;
    std::vector<float> x(x_in, x_in + (size_t)M * H), xn((size_t)M * H), q((size_t)M * QD),
        kv((size_t)M * KD * 2), att((size_t)M * QD), g((size_t)M * FF), u((size_t)M * FF);
    int64_t max_pos = 0;
    for (int m = 0; m < M; m++) max_pos = pos[m] > max_pos ? pos[m] : max_pos;
    if (max_pos >= cache_len) return 1;
    const int64_t SR = (max_pos + 8) & ~int64_t(7);  // scores per (row, head), padded to 8
    std::vector<float> scores((size_t)M * NH * SR);
    const float att_scale = 1.0f / std::sqrt((float)HD);
    const int half = HD / 2;
    const size_t kvs = kv_bytes(kv_type);
    // RoPE's cos and sin per row, the same for every layer
    std::vector<float> rcos((size_t)M * half), rsin((size_t)M * half);
    for (int m = 0; m < M; m++)
        for (int i = 0; i < half; i++) {
            const float f = (float)pos[m] * inv_freq[i];
            rcos[(size_t)m * half + i] = std::cos(f);
            rsin[(size_t)m * half + i] = std::sin(f);
        }
    const int group = NH / NKV;
    // the quantized copy of the current matmul input (int8 weights): one buffer serves every
    // input in turn, since each is consumed (and a barrier passed) before the next is made
    const bool q8 = Q8 && wt == I8;
    const int64_t KQ = q8_padded(H > QD ? (H > FF ? H : FF) : (QD > FF ? QD : FF));
    std::vector<int16_t> qbuf(q8 ? (size_t)M * KQ + 32 : 0);  // 64 bytes spare: its rows start at a line
    std::vector<float> sbuf(q8 ? (size_t)M : 0);
    int16_t* qb = q8_align(qbuf.data());
    Q8Rows xq_h = q8_view(qb, sbuf.data(), H);    // normed hidden rows
    Q8Rows xq_a = q8_view(qb, sbuf.data(), QD);   // attention output
    Q8Rows xq_f = q8_view(qb, sbuf.data(), FF);   // SiLU(gate) * up
    Q8Rows* hq = q8 ? &xq_h : nullptr;
    constexpr int64_t FBS = 32;  // SiLU(gate) * up in items of 32 values
    const int64_t FB = (FF + FBS - 1) / FBS;

#ifdef __SSE__
    const unsigned int csr = _mm_getcsr();
#endif
    #pragma omp parallel num_threads(n_threads)
    {
#ifdef __SSE__
        // flush denormals to zero on every thread of the step: a denormal operand costs a
        // microcode assist per FMA (measured: a 768x768 GEMV 300x slower); restored below
        _mm_setcsr(_mm_getcsr() | 0x8040);
#endif
        for (int l = 0; l < L; l++) {
            const int64_t* p = layer_ptrs + (size_t)l * 13;
            const int64_t* s = scale_ptrs ? scale_ptrs + (size_t)l * 7 : nullptr;
            char* kc = (char*)p[9];
            char* vc = (char*)p[10];
            float* ksc = (float*)p[11];  // scale (m, head, position) at [(m * row stride) / HD + head * len + pos]
            float* vsc = (float*)p[12];
            rmsnorm_rows(M, x.data(), (const float*)p[0], H, eps, xn.data(), hq);
            gemv(M, xn.data(), xq_h, H, (const void*)p[1], s ? (const float*)s[0] : nullptr, wt, QD, q.data(), QD, false);
            gemv(M, xn.data(), xq_h, H, (const void*)p[2], s ? (const float*)s[1] : nullptr, wt, KD, kv.data(), 2 * KD, false);
            gemv(M, xn.data(), xq_h, H, (const void*)p[3], s ? (const float*)s[2] : nullptr, wt, KD, kv.data() + KD, 2 * KD, false);
            // RoPE on q and k, then store k and v at each row's position
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < (int64_t)M * (NH + NKV); t++) {
                const int m = (int)(t / (NH + NKV));
                const int h = (int)(t % (NH + NKV));
                float* vec = h < NH ? q.data() + (size_t)m * QD + (size_t)h * HD
                                    : kv.data() + (size_t)m * 2 * KD + (size_t)(h - NH) * HD;
                for (int i = 0; i < half; i++) {
                    const float c = rcos[(size_t)m * half + i], sn = rsin[(size_t)m * half + i];
                    const float a = vec[i], b = vec[i + half];
                    vec[i] = a * c - b * sn;
                    vec[i + half] = b * c + a * sn;
                }
                if (h >= NH) {
                    const int kh = h - NH;
                    const size_t off = (size_t)m * cache_row_stride + ((size_t)kh * cache_len + pos[m]) * HD;
                    const size_t so = off / HD;
                    store_kv(kc + off * kvs, ksc ? ksc + so : nullptr, vec, HD, kv_type);
                    store_kv(vc + off * kvs, vsc ? vsc + so : nullptr, kv.data() + (size_t)m * 2 * KD + KD + (size_t)kh * HD,
                             HD, kv_type);
                }
            }
            // attention: row m, head h over positions 0..pos[m] of its own cache row. Head-major, so
            // a thread's consecutive items share a head: when the rows are one sequence (a prefill,
            // kernels.DecodeKernel.prefill) that head's keys and values stay in cache across rows.
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < (int64_t)M * NH; t++) {
                const int m = (int)(t % M), h = (int)(t / M), kh = h / group;
                const int64_t S = pos[m] + 1;
                const float* qv = q.data() + (size_t)m * QD + (size_t)h * HD;
                const size_t base = (size_t)m * cache_row_stride + (size_t)kh * cache_len * HD;
                attend(qv, kc + base * kvs, vc + base * kvs, ksc ? ksc + base / HD : nullptr,
                       vsc ? vsc + base / HD : nullptr, S, HD, att_scale, kv_type, scores.data() + (size_t)t * SR,
                       att.data() + (size_t)m * QD + (size_t)h * HD);
            }
            if (q8) {  // a row's scale needs all of it: quantized once every head is done
                #pragma omp for schedule(static)
                for (int m = 0; m < M; m++) q8_row(att.data() + (size_t)m * QD, xq_a, m);
            }
            gemv(M, att.data(), xq_a, QD, (const void*)p[4], s ? (const float*)s[3] : nullptr, wt, H, x.data(), H, true);
            rmsnorm_rows(M, x.data(), (const float*)p[5], H, eps, xn.data(), hq);
            gemv(M, xn.data(), xq_h, H, (const void*)p[6], s ? (const float*)s[4] : nullptr, wt, FF, g.data(), FF, false);
            gemv(M, xn.data(), xq_h, H, (const void*)p[7], s ? (const float*)s[5] : nullptr, wt, FF, u.data(), FF, false);
            // SiLU(gate) * up, 32 values an item
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < (int64_t)M * FB; t++) {
                const int m = (int)(t / FB);
                const int64_t b = t % FB;
                float* gr = g.data() + (size_t)m * FF;
                const float* ur = u.data() + (size_t)m * FF;
                int64_t i = b * FBS;
                const int64_t e = FF < (b + 1) * FBS ? FF : (b + 1) * FBS;
                for (; i + 8 <= e; i += 8) {
                    v8f a, up;
                    std::memcpy(&a, gr + i, 32);
                    std::memcpy(&up, ur + i, 32);
                    a = a / (1.0f + vexp(-a)) * up;
                    std::memcpy(gr + i, &a, 32);
                }
                for (; i < e; i++) gr[i] = gr[i] / (1.0f + std::exp(-gr[i])) * ur[i];
            }
            if (q8) {
                #pragma omp for schedule(static)
                for (int m = 0; m < M; m++) q8_row(g.data() + (size_t)m * FF, xq_f, m);
            }
            gemv(M, g.data(), xq_f, FF, (const void*)p[8], s ? (const float*)s[6] : nullptr, wt, H, x.data(), H, true);
        }
        // logits of rows head_from.. only (a prefill needs its last row's: the others' would cost
        // a 2 x hidden x vocab product each for nothing)
        const int MH = M - head_from;
        rmsnorm_rows(MH, x.data() + (size_t)head_from * H, (const float*)head_ptrs[0], H, eps, xn.data(), hq);
        gemv(MH, xn.data(), xq_h, H, (const void*)head_ptrs[1], (const float*)head_ptrs[2], wt, V, logits, V, false);
    }
#ifdef __SSE__
    _mm_setcsr(csr);
#endif
    return 0;
}

// Which int8 instruction path this build uses (reported by benchmarks and tests).
extern "C" const char* sc_int8_path() { return Q8 ? Q8_PATH : "widen-to-fp32"; }

// fp32 -> the fp16 cache's bits (h) -> fp32 (back), through the same conversions as a step: what
// tests compare with torch's, on the path this build has (F16C or the portable one).
extern "C" void sc_f16(const float* x, uint16_t* h, float* back, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) store_kv(h + i, nullptr, x + i, n - i < 8 ? (int)(n - i) : 8, KV_F16);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) { v8f v = load_kv(h, i, KV_F16); std::memcpy(back + i, &v, 32); }
    for (; i < n; i++) back[i] = load_kv1(h, i, KV_F16);
}
