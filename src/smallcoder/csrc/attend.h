// Attention of one query row against one head's cached keys and values (included by decode.cpp),
// with a vectorized exp for its softmax and for the MLP's SiLU.
//
// Why: at a 1,000-token context the keys and values are a third of the bytes a 303M int8 step
// reads (147 MB in fp32), and the former loop took 9 ms of a 24 ms step for them: a scalar exp
// per score, the output vector reloaded and stored once per position, no prefetch. Here four keys
// share each query load, the output accumulates in registers, the rows ahead are prefetched, and
// the cache may hold fp16 (half the bytes; torch's .to(float16) bits, round to nearest even) or
// int8 with one fp32 scale per head and position (a quarter; quant.quantize_rows' bits), the
// same values model.KVCache stores from a PyTorch prefill.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// the cache's element type; int8 rows (one head's key or value at one position) carry an fp32 scale
enum KVType { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2 };

static inline int kv_bytes(int kt) { return kt == KV_F32 ? 4 : (kt == KV_F16 ? 2 : 1); }

static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp on 8 lanes, Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-7 polynomial,
// 2^n through the exponent bits (within 2 ulp of expf); NaN stays NaN
static inline v8f vexp(v8f x) {
    const v8f hi = {88.3762626647949f, 88.3762626647949f, 88.3762626647949f, 88.3762626647949f,
                    88.3762626647949f, 88.3762626647949f, 88.3762626647949f, 88.3762626647949f};
    const v8f lo = -hi + 0.96f;  // -87.4: exp stays a normal float
    x = x > hi ? hi : x;
    x = x < lo ? lo : x;
    v8f fx = x * 1.44269504088896341f + 0.5f;
    v8i n = __builtin_convertvector(fx, v8i);               // truncates toward zero
    n -= (v8i)(__builtin_convertvector(n, v8f) > fx) & 1;    // so floor
    const v8f fn = __builtin_convertvector(n, v8f);
    x = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    const v8f z = x * x;
    v8f y = x * 1.9875691500e-4f + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * z + x + 1.0f;
    const v8i e = (n + 127) << 23;
    v8f p; std::memcpy(&p, &e, 32);
    return y * p;
}

// fp16 <-> fp32 one value at a time (IEEE binary16, round to nearest even): the path for CPUs
// without F16C, and for the tails
static inline float h2f(uint16_t h) {
    const uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t u;
    if (e == 0x1f) u = s | 0x7f800000 | (m << 13);               // inf, NaN
    else if (e != 0) u = s | ((e + 112) << 23) | (m << 13);      // normal
    else if (m == 0) u = s;                                      // zero
    else {                                                       // subnormal: normalize
        int k = 0;
        uint32_t mm = m;
        while (!(mm & 0x400)) { mm <<= 1; k++; }
        u = s | ((uint32_t)(113 - k) << 23) | ((mm & 0x3ff) << 13);
    }
    float f; std::memcpy(&f, &u, 4); return f;
}

static inline uint16_t f2h(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    const uint16_t s = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffff;
    if (a >= 0x7f800000) return s | 0x7c00 | (a > 0x7f800000 ? 0x200 : 0);  // inf, NaN (quiet)
    if (a >= 0x477ff000) return s | 0x7c00;                      // rounds past 65504: inf
    if (a < 0x38800000) {                                        // below 2^-14: subnormal or zero
        if (a < 0x33000000) return s;                            // under half the least subnormal
        const uint32_t m = (a & 0x7fffff) | 0x800000;
        const int shift = 126 - (int)(a >> 23);                  // 14..24
        const uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        return s | (uint16_t)(r + (rem > halfway || (rem == halfway && (r & 1))));
    }
    const uint32_t r = a - 0x38000000;                           // rebias 127 -> 15, then round
    return s | (uint16_t)((r + 0xfff + ((r >> 13) & 1)) >> 13);
}

static inline v8f load_kv(const void* p, int64_t i, int kt) {
    if (kt == KV_F32) { v8f r; std::memcpy(&r, (const float*)p + i, 32); return r; }
    if (kt == KV_I8) {
        typedef int8_t v8b __attribute__((vector_size(8)));
        v8b b; std::memcpy(&b, (const int8_t*)p + i, 8);
        return __builtin_convertvector(__builtin_convertvector(b, v8i), v8f);
    }
#if defined(__F16C__)
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
#else
    v8f r;
    for (int j = 0; j < 8; j++) r[j] = h2f(((const uint16_t*)p)[i + j]);
    return r;
#endif
}

static inline float load_kv1(const void* p, int64_t i, int kt) {
    if (kt == KV_I8) return (float)((const int8_t*)p)[i];
    return kt == KV_F32 ? ((const float*)p)[i] : h2f(((const uint16_t*)p)[i]);
}

// n values from src into a cache row of type kt (int8: its scale to *scale, as quant.quantize_rows:
// max|x| / 127, at least 1e-12 / 127, and round(x / scale) half to even)
static inline void store_kv(void* dst, float* scale, const float* src, int n, int kt) {
    if (kt == KV_F32) { std::memcpy(dst, src, n * sizeof(float)); return; }
    if (kt == KV_I8) {
        float amax = 0;
        for (int i = 0; i < n; i++) amax = std::fmax(amax, std::fabs(src[i]));
        const float sc = std::fmax(amax, 1e-12f) / 127.0f;
        for (int i = 0; i < n; i++) {
            const float r = std::nearbyint(src[i] / sc);
            ((int8_t*)dst)[i] = (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
        }
        *scale = sc;
        return;
    }
    uint16_t* d = (uint16_t*)dst;
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) d[i] = f2h(src[i]);
}

static inline void prefetch_row(const void* p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char*)p + o, 0, 3);
}

#ifndef KV_PREFETCH
#define KV_PREFETCH 4096
#endif
// rows prefetched ahead: KV_PREFETCH bytes' worth
static inline int64_t kv_ahead(int64_t rb) { return (KV_PREFETCH + rb - 1) / rb; }

// out[c..c+8*NV) = sum_j p[j] * v_j[c..], its NV vectors kept in registers over all positions
template <int NV>
static inline void weigh_values(const float* p, int64_t S, const void* vb, int HD, int c, int kt,
                                float* out) {
    v8f acc[NV];
    for (int i = 0; i < NV; i++) acc[i] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t rb = (int64_t)HD * kv_bytes(kt), ahead = kv_ahead(rb);
    for (int64_t j = 0; j < S; j++) {
        if (c == 0 && j + ahead < S) prefetch_row((const char*)vb + (j + ahead) * rb, rb);
        const float w = p[j];
        for (int i = 0; i < NV; i++) acc[i] += w * load_kv(vb, j * HD + c + 8 * i, kt);
    }
    for (int i = 0; i < NV; i++) std::memcpy(out + c + 8 * i, &acc[i], 32);
}

#if defined(__AVX512F__)
// With AVX-512 and a head size of 16k (up to 128): 16 lanes, half the instructions per position
// (the conversions and FMAs, not the bytes, bounded the 8-lane loops at fp16).
static inline __m512 load16_kv(const void* p, int64_t i, int kt) {
    if (kt == KV_F32) return _mm512_loadu_ps((const float*)p + i);
    if (kt == KV_I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)p + i))));
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)p + i)));
}

static inline void scores16(const float* qv, const void* kb, int64_t S, int HD, float scale, int kt,
                            float* sr) {
    const int64_t rb = (int64_t)HD * kv_bytes(kt), ahead = kv_ahead(rb);
    int64_t j = 0;
    for (; j + 4 <= S; j += 4) {
        if (j + 4 + ahead <= S) prefetch_row((const char*)kb + (j + ahead) * rb, 4 * rb);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < HD; i += 16) {
            const __m512 qi = _mm512_loadu_ps(qv + i);
            a0 = _mm512_fmadd_ps(qi, load16_kv(kb, (j + 0) * HD + i, kt), a0);
            a1 = _mm512_fmadd_ps(qi, load16_kv(kb, (j + 1) * HD + i, kt), a1);
            a2 = _mm512_fmadd_ps(qi, load16_kv(kb, (j + 2) * HD + i, kt), a2);
            a3 = _mm512_fmadd_ps(qi, load16_kv(kb, (j + 3) * HD + i, kt), a3);
        }
        sr[j] = _mm512_reduce_add_ps(a0) * scale;
        sr[j + 1] = _mm512_reduce_add_ps(a1) * scale;
        sr[j + 2] = _mm512_reduce_add_ps(a2) * scale;
        sr[j + 3] = _mm512_reduce_add_ps(a3) * scale;
    }
    for (; j < S; j++) {
        __m512 a = _mm512_setzero_ps();
        for (int i = 0; i < HD; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qv + i), load16_kv(kb, j * HD + i, kt), a);
        sr[j] = _mm512_reduce_add_ps(a) * scale;
    }
}

template <int NV>
static inline void values16(const float* p, int64_t S, const void* vb, int HD, int kt, float* out) {
    __m512 acc[NV];
    for (int i = 0; i < NV; i++) acc[i] = _mm512_setzero_ps();
    const int64_t rb = (int64_t)HD * kv_bytes(kt), ahead = kv_ahead(rb);
    for (int64_t j = 0; j < S; j++) {
        if (j + ahead < S) prefetch_row((const char*)vb + (j + ahead) * rb, rb);
        const __m512 w = _mm512_set1_ps(p[j]);
        for (int i = 0; i < NV; i++) acc[i] = _mm512_fmadd_ps(w, load16_kv(vb, j * HD + 16 * i, kt), acc[i]);
    }
    for (int i = 0; i < NV; i++) _mm512_storeu_ps(out + 16 * i, acc[i]);
}
#endif

// softmax(q . k_j * scale) . v over positions 0..S-1 of one head (keys and values at kb and vb,
// HD values a position; an int8 cache's row scales at ks and vs); sr is scratch for S scores
// (rounded up to 8)
static void attend(const float* qv, const void* kb, const void* vb, const float* ks, const float* vs,
                   int64_t S, int HD, float scale, int kt, float* sr, float* out) {
    const int HD8 = HD & ~7;
    const int64_t rb = (int64_t)HD * kv_bytes(kt), ahead = kv_ahead(rb);
    float mx = -INFINITY;
    int64_t j = 0;
#if defined(__AVX512F__)
    const bool wide = HD % 16 == 0 && HD <= 128;
    if (wide) {
        scores16(qv, kb, S, HD, scale, kt, sr);
        // 16 lanes at a time: GCC leaves the max scalar, a 4-cycle chain per score (a twelfth of a
        // 512-token prefill); the max of the same values in any order is the same
        __m512 m16 = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= S; j += 16) {
            __m512 v = _mm512_loadu_ps(sr + j);
            if (ks) v = _mm512_mul_ps(v, _mm512_loadu_ps(ks + j)), _mm512_storeu_ps(sr + j, v);
            m16 = _mm512_max_ps(v, m16);
        }
        mx = _mm512_reduce_max_ps(m16);
        for (; j < S; j++) {
            if (ks) sr[j] *= ks[j];
            mx = sr[j] > mx ? sr[j] : mx;
        }
    }
#endif
    for (; j + 4 <= S; j += 4) {  // four keys share each load of q
        if (j + 4 + ahead <= S) prefetch_row((const char*)kb + (j + ahead) * rb, 4 * rb);
        v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int i = 0; i < HD8; i += 8) {
            v8f qi; std::memcpy(&qi, qv + i, 32);
            a0 += qi * load_kv(kb, (j + 0) * HD + i, kt);
            a1 += qi * load_kv(kb, (j + 1) * HD + i, kt);
            a2 += qi * load_kv(kb, (j + 2) * HD + i, kt);
            a3 += qi * load_kv(kb, (j + 3) * HD + i, kt);
        }
        float d[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
        for (int r = 0; r < 4; r++) {
            for (int i = HD8; i < HD; i++) d[r] += qv[i] * load_kv1(kb, (j + r) * HD + i, kt);
            sr[j + r] = d[r] * scale * (ks ? ks[j + r] : 1.0f);
            mx = sr[j + r] > mx ? sr[j + r] : mx;
        }
    }
    for (; j < S; j++) {
        v8f a = {};
        for (int i = 0; i < HD8; i += 8) {
            v8f qi; std::memcpy(&qi, qv + i, 32);
            a += qi * load_kv(kb, j * HD + i, kt);
        }
        float d = hsum(a);
        for (int i = HD8; i < HD; i++) d += qv[i] * load_kv1(kb, j * HD + i, kt);
        sr[j] = d * scale * (ks ? ks[j] : 1.0f);
        mx = sr[j] > mx ? sr[j] : mx;
    }
    // exponentials 8 at a time; the padding lanes past S are computed and not counted
    for (int64_t t = S; t < ((S + 7) & ~int64_t(7)); t++) sr[t] = mx;
    v8f total = {};
    for (int64_t t = 0; t < S; t += 8) {
        v8f e; std::memcpy(&e, sr + t, 32);
        e = vexp(e - mx);
        std::memcpy(sr + t, &e, 32);
        if (t + 8 <= S) total += e;
        else for (int64_t r = t; r < S; r++) total[0] += e[r - t];
    }
    const float inv = 1.0f / hsum(total);
    for (int64_t t = 0; t < S; t++) sr[t] *= vs ? inv * vs[t] : inv;  // an int8 value row's scale joins its weight
#if defined(__AVX512F__)
    if (wide) {
        switch (HD / 16) {
            case 8: values16<8>(sr, S, vb, HD, kt, out); return;
            case 7: values16<7>(sr, S, vb, HD, kt, out); return;
            case 6: values16<6>(sr, S, vb, HD, kt, out); return;
            case 5: values16<5>(sr, S, vb, HD, kt, out); return;
            case 4: values16<4>(sr, S, vb, HD, kt, out); return;
            case 3: values16<3>(sr, S, vb, HD, kt, out); return;
            case 2: values16<2>(sr, S, vb, HD, kt, out); return;
            default: values16<1>(sr, S, vb, HD, kt, out); return;
        }
    }
#endif
    int c = 0;
    for (; c + 96 <= HD8; c += 96) weigh_values<12>(sr, S, vb, HD, c, kt, out);
    switch ((HD8 - c) / 8) {
        case 11: weigh_values<11>(sr, S, vb, HD, c, kt, out); break;
        case 10: weigh_values<10>(sr, S, vb, HD, c, kt, out); break;
        case 9: weigh_values<9>(sr, S, vb, HD, c, kt, out); break;
        case 8: weigh_values<8>(sr, S, vb, HD, c, kt, out); break;
        case 7: weigh_values<7>(sr, S, vb, HD, c, kt, out); break;
        case 6: weigh_values<6>(sr, S, vb, HD, c, kt, out); break;
        case 5: weigh_values<5>(sr, S, vb, HD, c, kt, out); break;
        case 4: weigh_values<4>(sr, S, vb, HD, c, kt, out); break;
        case 3: weigh_values<3>(sr, S, vb, HD, c, kt, out); break;
        case 2: weigh_values<2>(sr, S, vb, HD, c, kt, out); break;
        case 1: weigh_values<1>(sr, S, vb, HD, c, kt, out); break;
        default: break;
    }
    for (int i = HD8; i < HD; i++) {
        float t = 0;
        for (int64_t jj = 0; jj < S; jj++) t += sr[jj] * load_kv1(vb, jj * HD + i, kt);
        out[i] = t;
    }
}
