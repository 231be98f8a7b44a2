// One step of a Llama-style model for a few rows, each row one new token of some KV cache row
// (a batched decode step, a prefill chunk, a speculative verify: sc_decode below): the whole step
// in one OpenMP parallel region, so no per-op dispatch and every thread streams weights at once.
// Any row count M works; the forward's one-token steps and prefill chunks hand it at most
// MAX_ROWS (16) rows, and kernels.kernel_faster decides for SmallCoder.forward_rows.
//
// Why: at batch 1 a decode step reads every weight once and does 2 FLOPs per weight, so it is
// bound by memory bandwidth. PyTorch's one-row matmul runs on one thread at ~40% of the bandwidth
// here and each small op costs microseconds of dispatch; this loop keeps every core streaming.
// Weights are fp32, bf16, or int8 with one fp32 scale per output row. With fp32/bf16 weights the
// activations and all accumulation are fp32; int8 weights meet int16 activations (q8dot.h: each
// row quantized on the fly with one scale, integer dot products), fp32/bf16 ones gemm.h's
// products, each summed in one order whatever the rows, as int8's are: a token's logits do not
// depend on the rows it ran with. RMSNorm, RoPE, attention, softmax, the KV
// cache and the residual stream are fp32 in every case. Plain C++ with GCC vector extensions:
// -march=native picks AVX2, AVX-512 or NEON. The arithmetic follows model.py (fp32 RMSNorm,
// rotate-half RoPE, softmax). Defining SC_INT8_WIDEN builds the former int8 path (each weight
// widened to fp32), kept only so benchmarks/kernel_step.py can compare the two.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>
#include <omp.h>
#if defined(__AVX2__) || defined(__SSE__)
#include <immintrin.h>
#endif
#include "attend.h"
#include "gemm.h"
#include "q8dot.h"

// Buffers on 64-byte boundaries: a 64-byte load that straddles two cache lines costs two, and the
// products load their input rows a vector at a time (measured: fp32 blocks ~20% slower unaligned).
template <class T>
struct Aligned64 {
    using value_type = T;
    Aligned64() = default;
    template <class U> Aligned64(const Aligned64<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U> bool operator==(const Aligned64<U>&) const { return true; }
    template <class U> bool operator!=(const Aligned64<U>&) const { return false; }
};
using fvec = std::vector<float, Aligned64<float>>;

#ifdef SC_INT8_WIDEN
constexpr bool Q8 = false;
#else
constexpr bool Q8 = true;  // int8 weights take q8dot.h's integer path
#endif

// x (M x K, fp32) times each of n weight matrices: with int8 weights (Q8) the products read xq,
// x already quantized. fp32/bf16 products of one x share one split of their rows across threads.
static void gemv(int M, const float* x, const Q8Rows& xq, int64_t K, const GemmOut* outs, int n, int wt,
                 bool accumulate) {
    if (wt == F32) gemm_f<F32>(M, x, K, outs, n, accumulate);
    else if (wt == BF16) gemm_f<BF16>(M, x, K, outs, n, accumulate);
    else if (!Q8) gemm_f<I8>(M, x, K, outs, n, accumulate);
    else
        for (int i = 0; i < n; i++)
            gemv_q8(M, xq, (const int8_t*)outs[i].W, outs[i].scale, outs[i].N, outs[i].y, outs[i].ldy, accumulate);
}

static void gemv(int M, const float* x, const Q8Rows& xq, int64_t K, const void* W, const float* scale,
                 int wt, int64_t N, float* y, int64_t ldy, bool accumulate) {
    const GemmOut g{W, scale, N, y, ldy};
    gemv(M, x, xq, K, &g, 1, wt, accumulate);
}

// out row m = RMSNorm(x row src[m]) (src null: row m); with xq, also quantized for the int8
// products that read it (in the same loop, so no extra barrier)
static void rmsnorm_rows(int M, const float* x, const int64_t* src, const float* w, int64_t H, float eps,
                         float* out, Q8Rows* xq) {
    #pragma omp for schedule(static)
    for (int m = 0; m < M; m++) {
        const float* xr = x + (size_t)(src ? src[m] : m) * H;
        float ss = 0;
        for (int64_t i = 0; i < H; i++) ss += xr[i] * xr[i];
        const float r = 1.0f / std::sqrt(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) out[(size_t)m * H + i] = w[i] * (xr[i] * r);
        if (xq) q8_row(out + (size_t)m * H, *xq, m);
    }
}

// Row m is one new token of KV cache row crow[m] (at crow[m] * cache_row_stride) at position
// pos[m]. Every row's keys and values are stored before any row attends, so rows of one cache row
// at consecutive positions form a causal multi-position step (a prefill chunk, a speculative
// verify) and rows of different cache rows a batched decode step; two rows must not share a
// (cache row, position). Logits are computed for rows head_rows[0..n_head) only, into logits
// (n_head x V): a prefill needs its last row's, and the others would cost a hidden x vocab
// product each for nothing.
// Per layer, 13 pointers: input_norm, q, k, v, o, post_norm, gate, up, down weights, then the
// layer's K and V caches (fp32, fp16 or int8: kv_type) and, for int8, their row scales (else 0).
// Weight scales (int8 weights only), per layer: q, k, v, o, gate, up, down (7).
// Head: final norm, lm_head weight, lm_head scale.
extern "C" int sc_decode(
    int M, int n_threads, const float* x_in, const int64_t* crow, const int64_t* pos,
    const int64_t* layer_ptrs, const int64_t* scale_ptrs, const int64_t* head_ptrs,
    int L, int H, int NH, int NKV, int HD, int FF, int V, int64_t cache_row_stride, int64_t cache_len,
    int wt, int kv_type, float eps, const float* inv_freq, const int64_t* head_rows, int n_head, float* logits) {
    const int64_t QD = (int64_t)NH * HD, KD = (int64_t)NKV * HD;
    const int MX = M > n_head ? M : n_head;  // rows of the normed input: the layers' M, the head's n_head
    fvec x(x_in, x_in + (size_t)M * H), xn((size_t)MX * H), q((size_t)M * QD),
        kv((size_t)M * KD * 2), att((size_t)M * QD), g((size_t)M * FF), u((size_t)M * FF);
    int64_t max_pos = 0;
    for (int m = 0; m < M; m++) max_pos = pos[m] > max_pos ? pos[m] : max_pos;
    if (max_pos >= cache_len) return 1;
    const int64_t SR = (max_pos + 8) & ~int64_t(7);  // scores per (row, head), padded to 8
    std::vector<float> scores((size_t)n_threads * SR);  // one (row, head)'s scores per thread at a time
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
    std::vector<int16_t> qbuf(q8 ? (size_t)MX * KQ + 32 : 0);  // 64 bytes spare: its rows start at a line
    std::vector<float> sbuf(q8 ? (size_t)MX : 0);
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
            rmsnorm_rows(M, x.data(), nullptr, (const float*)p[0], H, eps, xn.data(), hq);
            const GemmOut qkv[3] = {{(const void*)p[1], s ? (const float*)s[0] : nullptr, QD, q.data(), QD},
                                    {(const void*)p[2], s ? (const float*)s[1] : nullptr, KD, kv.data(), 2 * KD},
                                    {(const void*)p[3], s ? (const float*)s[2] : nullptr, KD, kv.data() + KD, 2 * KD}};
            gemv(M, xn.data(), xq_h, H, qkv, 3, wt, false);
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
                    const size_t off = (size_t)crow[m] * cache_row_stride + ((size_t)kh * cache_len + pos[m]) * HD;
                    const size_t so = off / HD;
                    store_kv(kc + off * kvs, ksc ? ksc + so : nullptr, vec, HD, kv_type);
                    store_kv(vc + off * kvs, vsc ? vsc + so : nullptr, kv.data() + (size_t)m * 2 * KD + KD + (size_t)kh * HD,
                             HD, kv_type);
                }
            }
            // attention: row m, head h over positions 0..pos[m] of its cache row. Head-major, so a
            // thread's consecutive items share a head: when rows are one sequence (a prefill chunk)
            // that head's keys and values stay in cache across rows.
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < (int64_t)M * NH; t++) {
                const int m = (int)(t % M), h = (int)(t / M), kh = h / group;
                const int64_t S = pos[m] + 1;
                const float* qv = q.data() + (size_t)m * QD + (size_t)h * HD;
                const size_t base = (size_t)crow[m] * cache_row_stride + (size_t)kh * cache_len * HD;
                attend(qv, kc + base * kvs, vc + base * kvs, ksc ? ksc + base / HD : nullptr,
                       vsc ? vsc + base / HD : nullptr, S, HD, att_scale, kv_type,
                       scores.data() + (size_t)omp_get_thread_num() * SR,
                       att.data() + (size_t)m * QD + (size_t)h * HD);
            }
            if (q8) {  // a row's scale needs all of it: quantized once every head is done
                #pragma omp for schedule(static)
                for (int m = 0; m < M; m++) q8_row(att.data() + (size_t)m * QD, xq_a, m);
            }
            gemv(M, att.data(), xq_a, QD, (const void*)p[4], s ? (const float*)s[3] : nullptr, wt, H, x.data(), H, true);
            rmsnorm_rows(M, x.data(), nullptr, (const float*)p[5], H, eps, xn.data(), hq);
            const GemmOut gate_up[2] = {{(const void*)p[6], s ? (const float*)s[4] : nullptr, FF, g.data(), FF},
                                        {(const void*)p[7], s ? (const float*)s[5] : nullptr, FF, u.data(), FF}};
            gemv(M, xn.data(), xq_h, H, gate_up, 2, wt, false);
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
        rmsnorm_rows(n_head, x.data(), head_rows, (const float*)head_ptrs[0], H, eps, xn.data(), hq);
        gemv(n_head, xn.data(), xq_h, H, (const void*)head_ptrs[1], (const float*)head_ptrs[2], wt, V, logits, V, false);
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

// Which fp32/bf16 product path this build uses (gemm.h: avx512, avx2 or portable).
extern "C" const char* sc_gemm_path() { return GEMM_PATH; }
