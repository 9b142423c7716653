/* Attention of the batch-invariant forward, for CPUs with AVX-512: every packed query token
 * against the keys and values of its own KV slot at positions [0, nvis), in fp32, for bf16 or
 * fp32 KV pools.
 *
 * Why our own: the fixed-chunk attention in torch ops (speculation/invariant.py) costs ~25 small
 * operators per layer (casts, padding, two matmuls, exp, sums): 140 us per layer for one decode
 * token at a 700-token context, 4 of a bf16 decode forward's 17 ms, and 409 of a 700-token
 * prefill's 718 ms.
 *
 * Each (query token, query head) is computed by the same instructions whatever else is in the
 * call: the scores q.k_j for j = 0 .. nvis-1 in position order (one 16-lane fp32 FMA chain over
 * the head dimension, then a fixed horizontal sum), their exact maximum, exp(s_j - max) by a
 * fixed polynomial, the sum and the weighted values accumulated in position order, then one
 * division (and one round-to-nearest-even to bf16 for a bf16 model). A token's result depends
 * on its query and its slot's keys and values only, so the forward is batch-invariant by
 * construction: alone, among drafts, in a prompt chunk or beside other rows, the same bits.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAXG 8      /* query heads per kv head */
#define MAXC 16     /* head dimension / 16 */

static inline __m512 load16(const char *p, int bf16) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps((const float *)p);
}

/* e^x for x <= 0 (Cephes' expf polynomial after x = n ln2 + r, |r| <= ln2 / 2) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));        /* e^-104 is 0 in fp32 after scalef */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* token t, kv head kh: its G query heads over positions [0, nvis[t]) of its slot. G and C are
 * constants where called from the dispatch below, so q and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void one(const void *Q, const void *K, const void *V, void *O,
                                                       const int64_t *slot, const int64_t *nvis, int64_t t,
                                                       int64_t kh, int64_t Hq, const int64_t G, const int64_t C,
                                                       int64_t qs_t, int64_t qs_h, int64_t ks_slot, int64_t ks_head,
                                                       int64_t stride, float scale, const int bf16, float *s) {
    const int64_t D = C * 16, esz = bf16 ? 2 : 4, n = nvis[t];
    const char *kb = (const char *)K + (slot[t] * ks_slot + kh * ks_head) * esz;
    const char *vb = (const char *)V + (slot[t] * ks_slot + kh * ks_head) * esz;
    __m512 q[MAXG][MAXC];
    float mx[MAXG], sum[MAXG];
    for (int64_t g = 0; g < G; g++) {
        const char *qp = (const char *)Q + (t * qs_t + (kh * G + g) * qs_h) * esz;
        for (int64_t c = 0; c < C; c++) q[g][c] = _mm512_mul_ps(load16(qp + c * 16 * esz, bf16), _mm512_set1_ps(scale));
        mx[g] = -INFINITY;
    }
    /* scores, in position order, and their maximum */
    for (int64_t j = 0; j < n; j++) {
        __m512 k[MAXC];
        for (int64_t c = 0; c < C; c++) k[c] = load16(kb + (j * D + c * 16) * esz, bf16);
        for (int64_t g = 0; g < G; g++) {
            __m512 acc = _mm512_mul_ps(q[g][0], k[0]);
            for (int64_t c = 1; c < C; c++) acc = _mm512_fmadd_ps(q[g][c], k[c], acc);
            float sc = _mm512_reduce_add_ps(acc);
            s[g * stride + j] = sc;
            mx[g] = sc > mx[g] ? sc : mx[g];
        }
    }
    /* p_j = e^(s_j - max), 16 positions at a time (the tail masked: adds exact zeros) */
    for (int64_t g = 0; g < G; g++) {
        float *sg = s + g * stride;
        __m512 m = _mm512_set1_ps(mx[g]), tot = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            __mmask16 live = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
            __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sg + j), m)));
            _mm512_storeu_ps(sg + j, p);
            tot = _mm512_add_ps(tot, p);
        }
        sum[g] = _mm512_reduce_add_ps(tot);
    }
    /* sum_j p_j v_j in position order */
    __m512 o[MAXG][MAXC];
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < C; c++) o[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        __m512 v[MAXC];
        for (int64_t c = 0; c < C; c++) v[c] = load16(vb + (j * D + c * 16) * esz, bf16);
        for (int64_t g = 0; g < G; g++) {
            __m512 p = _mm512_set1_ps(s[g * stride + j]);
            for (int64_t c = 0; c < C; c++) o[g][c] = _mm512_fmadd_ps(p, v[c], o[g][c]);
        }
    }
    for (int64_t g = 0; g < G; g++) {
        __m512 inv = _mm512_set1_ps(1.0f / sum[g]);
        int64_t at = (t * Hq + kh * G + g) * D;
        for (int64_t c = 0; c < C; c++) {
            __m512 r = _mm512_mul_ps(o[g][c], inv);
            if (bf16) {
                float f[16];
                _mm512_storeu_ps(f, r);
                for (int i = 0; i < 16; i++) ((uint16_t *)O)[at + c * 16 + i] = f32_to_bf16(f[i]);
            } else {
                _mm512_storeu_ps((float *)O + at + c * 16, r);
            }
        }
    }
}

/* Q: [T, Hq, D] with element strides qs_t, qs_h (unit along D); K, V: pools [slots, Hkv, L, D]
 * with element strides ks_slot, ks_head (D along a position); O: [T, Hq, D] contiguous; all of
 * one dtype (bf16 when bf16, else fp32). slot[t], nvis[t] >= 1: token t's slot and how many
 * positions from 0 it sees; maxvis >= every nvis. Hq / Hkv <= MAXG, D a multiple of 16 <= 256.
 * The same instructions compute a (token, head) whatever the constants' dispatch: G and C only
 * unroll the loops. */
void specrag_attention(const void *Q, const void *K, const void *V, void *O, const int64_t *slot,
                       const int64_t *nvis, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t qs_t,
                       int64_t qs_h, int64_t ks_slot, int64_t ks_head, int64_t maxvis, float scale, int bf16,
                       int nthreads) {
    const int64_t G = Hq / Hkv, C = D / 16, stride = maxvis + 16;
    #pragma omp parallel num_threads(nthreads)
    {
        float *s = (float *)malloc(sizeof(float) * G * stride);     /* the caller checked the sizes */
        #pragma omp for schedule(static, 1)
        for (int64_t w = 0; w < T * Hkv; w++) {
            int64_t t = w / Hkv, kh = w % Hkv;
#define ONE(g, c, b) one(Q, K, V, O, slot, nvis, t, kh, Hq, g, c, qs_t, qs_h, ks_slot, ks_head, stride, scale, b, s)
            if (G == 3 && C == 4) { if (bf16) ONE(3, 4, 1); else ONE(3, 4, 0); }
            else if (G == 4 && C == 4) { if (bf16) ONE(4, 4, 1); else ONE(4, 4, 0); }
            else if (G == 4 && C == 8) { if (bf16) ONE(4, 8, 1); else ONE(4, 8, 0); }
            else if (bf16) ONE(G, C, 1);
            else ONE(G, C, 0);
#undef ONE
        }
        free(s);
    }
}
