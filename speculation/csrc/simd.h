/* The vector width and operations our fp32 kernels share (attention.c, lean.c): 16 lanes
 * where the build has AVX-512, else 8 (AVX2 + FMA), and e^x for x <= 0 by a fixed polynomial. A
 * build's operations are the same instructions wherever they are used. */
#ifndef SPECRAG_SIMD_H
#define SPECRAG_SIMD_H
#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define W 16
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vset1(x) _mm512_set1_ps(x)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vfmadd(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vfnmadd(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vsum(v) _mm512_reduce_add_ps(v)

static inline vf vload(const char *p, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps((const float *)p);
}

/* e^x's exponent part, 2^n (n integral, >= -126 or the clamp below) */
static inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vpow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
#define VEXP_MIN -104.0f      /* e^-104 is 0 in fp32 after scalef */

#else
#define W 8
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vset1(x) _mm256_set1_ps(x)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vfmadd(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vfnmadd(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vstore(p, v) _mm256_storeu_ps(p, v)

static inline float vsum(vf v) {       /* a fixed order: halves, then pairs, then the last two */
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

static inline vf vload(const char *p, int bf16) {
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    return _mm256_loadu_ps((const float *)p);
}

static inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* 2^n built in the exponent bits, so x is clamped at -87 (e^-87 ~ 1.6e-38, the smallest normal
 * float: a weight that vanishes beside the max's 1) */
static inline vf vpow2(vf p, vf n) {
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#define VEXP_MIN -87.0f

#endif

/* e^x for x <= 0 (Cephes' expf polynomial after x = n ln2 + r, |r| <= ln2 / 2), the same
 * operations in both builds but for the 2^n scaling */
static inline vf vexp(vf x) {
    x = vmax(x, vset1(VEXP_MIN));
    vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnmadd(n, vset1(0.693359375f), x);
    r = vfnmadd(n, vset1(-2.12194440e-4f), r);
    vf p = vset1(1.9875691500E-4f);
    p = vfmadd(p, r, vset1(1.3981999507E-3f));
    p = vfmadd(p, r, vset1(8.3334519073E-3f));
    p = vfmadd(p, r, vset1(4.1665795894E-2f));
    p = vfmadd(p, r, vset1(1.6666665459E-1f));
    p = vfmadd(p, r, vset1(5.0000001201E-1f));
    p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vpow2(p, n);
}

#endif
