/* Attention of the batch-invariant forward, for CPUs with AVX-512 or with AVX2 + FMA (the same
 * source, built once per instruction set: 16 or 8 fp32 lanes): every packed query token against
 * the keys and values of its own KV slot at positions [0, nvis), in fp32, for bf16 or fp32 KV
 * pools. The build for AVX512-BF16 computes a bf16 pool's products on VDPBF16PS instead
 * (one_dp, below): at a decode step's context, attention is most of what a drafted token adds
 * to a bf16 forward (AMD EPYC, SmolLM2, 700 positions: 0.40 of ~0.62 ms per token).
 *
 * Why our own: the fixed-chunk attention in torch ops (speculation/invariant.py) costs ~25 small
 * operators per layer (casts, padding, two matmuls, exp, sums): 140 us per layer for one decode
 * token at a 700-token context, 4 of a bf16 decode forward's 17 ms, and 409 of a 700-token
 * prefill's 718 ms. And torch's SDPA over a pool of ragged rows needs a padded group and a mask
 * per forward (an 8-row fp32 forward at a 700-token context spent ~100 ms in it on an AVX2 EPYC).
 *
 * Each (query token, query head) is computed by the same instructions whatever else is in the
 * call: the scores q.k_j for j = 0 .. nvis-1 in position order (one W-lane fp32 FMA chain over
 * the head dimension, then a fixed horizontal sum), their exact maximum, exp(s_j - max) by a
 * fixed polynomial, the sum and the weighted values accumulated in position order, then one
 * division (and one round-to-nearest-even to bf16 for a bf16 model). A token's result depends
 * on its query and its slot's keys and values only, so the forward is batch-invariant by
 * construction: alone, among drafts, in a prompt chunk or beside other rows, the same bits.
 * (The AVX-512 and AVX2 builds differ from each other in the last bits; a machine runs one.)
 *
 * A node of a draft tree sees the cached prefix and then its ancestors, whose keys and values
 * sit at scattered positions of the slot (siblings between them). Its visible positions are
 * taken in that logical order -- the prefix's [0, pre), then the ancestors' positions as listed
 * -- and the ones from the last multiple of four below pre on are copied into a contiguous
 * scratch first, so the same loops, blocked by four from logical position 0, compute it: the
 * bits plain decoding computes for the same token after the same path.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAXG 8      /* query heads per kv head */

#include "simd.h"

#define MAXC (256 / W)     /* head dimension / W, at most */

#if defined(__AVX512F__)
/* the first `live` (1..W) lanes of s, e^(s - m) there and exact zeros past them */
static inline vf vexp_tail(const float *s, vf m, int64_t live) {
    __mmask16 k = live >= W ? (__mmask16)0xffff : (__mmask16)((1u << live) - 1);
    return _mm512_maskz_mov_ps(k, vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s), m)));
}
#else
static inline vf vexp_tail(const float *s, vf m, int64_t live) {
    if (live >= W) return vexp(_mm256_sub_ps(_mm256_loadu_ps(s), m));
    __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)live), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    vf p = vexp(_mm256_sub_ps(_mm256_maskload_ps(s, k), m));
    return _mm256_and_ps(p, _mm256_castsi256_ps(k));
}
#endif


#if defined(__AVX512F__)
/* four positions' score accumulators -> their four sums, each by the additions of
 * _mm512_reduce_add_ps in the same tree (lane i + i+8, then i + i+4, i + i+2, i + i+1), four
 * positions per instruction instead of one */
static inline __m128 sums4(vf a0, vf a1, vf a2, vf a3) {
    vf b01 = vadd(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    vf b23 = vadd(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    vf c4 = vadd(_mm512_shuffle_f32x4(b01, b23, 0x88), _mm512_shuffle_f32x4(b01, b23, 0xDD));
    vf d4 = vadd(c4, _mm512_permute_ps(c4, 0x4E));
    vf e4 = vadd(d4, _mm512_permute_ps(d4, 0xB1));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), e4));
}

/* the larger of mx and m's four lanes (a max is order-free) */
static inline float max4(__m128 m, float mx) {
    float f[4];
    _mm_storeu_ps(f, m);
    for (int i = 0; i < 4; i++) mx = f[i] > mx ? f[i] : mx;
    return mx;
}
#endif

/* A token's logical positions [0, n): [0, b) at their own place in its slot (kb, vb), [b, n) in
 * the scratch kt, vt (row bytes apart). A draft tree's node (pre[t] < n) sees the prefix [0,
 * pre[t]) and then its ancestors at scattered positions: those from the multiple of four below
 * pre[t] on are copied into the scratch in that order, so blocks of four never straddle b.
 * Returns b (n for a chain token: no copy). */
static inline int64_t tree_scratch(const char *kb, const char *vb, const int64_t *pre, const int64_t *aoff,
                                   const int64_t *anc, int64_t t, int64_t n, int64_t row, char *kt, char *vt) {
    if (pre == 0 || pre[t] >= n) return n;
    int64_t b = pre[t] & ~(int64_t)3;
    for (int64_t j = b; j < n; j++) {
        int64_t at = j < pre[t] ? j : anc[aoff[t] + j - pre[t]];
        memcpy(kt + (j - b) * row, kb + at * row, row);
        memcpy(vt + (j - b) * row, vb + at * row, row);
    }
    return b;
}

/* token t, kv head kh: its G query heads over positions [0, nvis[t]) of its slot. G and C are
 * constants where called from the dispatch below, so q and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void one(const void *Q, const void *K, const void *V, void *O,
                                                       const int64_t *slot, const int64_t *nvis, const int64_t *pre,
                                                       const int64_t *aoff, const int64_t *anc, int64_t t,
                                                       int64_t kh, int64_t Hq, const int64_t G, const int64_t C,
                                                       int64_t qs_t, int64_t qs_h, int64_t ks_slot, int64_t ks_head,
                                                       int64_t stride, float scale, const int bf16, float *s,
                                                       char *kt, char *vt) {
    const int64_t D = C * W, esz = bf16 ? 2 : 4, n = nvis[t];
    const char *kb = (const char *)K + (slot[t] * ks_slot + kh * ks_head) * esz;
    const char *vb = (const char *)V + (slot[t] * ks_slot + kh * ks_head) * esz;
    const int64_t b = tree_scratch(kb, vb, pre, aoff, anc, t, n, D * esz, kt, vt);
#define KP(j) ((j) < b ? kb + (j) * D * esz : kt + ((j) - b) * D * esz)
#define VP(j) ((j) < b ? vb + (j) * D * esz : vt + ((j) - b) * D * esz)
    vf q[MAXG][MAXC];
    float mx[MAXG], sum[MAXG];
    for (int64_t g = 0; g < G; g++) {
        const char *qp = (const char *)Q + (t * qs_t + (kh * G + g) * qs_h) * esz;
        for (int64_t c = 0; c < C; c++) q[g][c] = vmul(vload(qp + c * W * esz, bf16), vset1(scale));
        mx[g] = -INFINITY;
    }
    /* scores, and their maximum: four positions at a time, each score its own chain of the
       same instructions as a lone position's (an FMA chain over the head dimension is latency
       bound; four independent ones keep the FMA units busy), then the rest one by one */
    int64_t j = 0;
#if defined(__AVX512F__)
    /* four positions at a time, their keys loaded once for the G heads; each score the FMA
       chain over the head dimension of a lone position, then the four accumulators reduced
       together (sums4: bitwise a lone position's vsum) */
    __m128 m4[MAXG];             /* the blocks' running maximum, four lanes (a max is order-free) */
    for (int64_t g = 0; g < G; g++) m4[g] = _mm_set1_ps(-INFINITY);
    if (G <= 4)       /* a[G][4], q[G][C], four keys: in registers (SmolLM2: G 3, C 4) */
        for (; j + 4 <= n; j += 4) {
            const char *k0 = KP(j);
            vf a[MAXG][4];
            for (int64_t c = 0; c < C; c++) {
                vf k4[4];
                for (int i = 0; i < 4; i++) k4[i] = vload(k0 + (i * D + c * W) * esz, bf16);
                for (int64_t g = 0; g < G; g++)
                    for (int i = 0; i < 4; i++) a[g][i] = c == 0 ? vmul(q[g][0], k4[i]) : vfmadd(q[g][c], k4[i], a[g][i]);
            }
            for (int64_t g = 0; g < G; g++) {
                __m128 s4 = sums4(a[g][0], a[g][1], a[g][2], a[g][3]);
                _mm_storeu_ps(s + g * stride + j, s4);
                m4[g] = _mm_max_ps(m4[g], s4);
            }
        }
    for (int64_t g = 0; g < G; g++) mx[g] = max4(m4[g], mx[g]);
#endif
    for (; j + 4 <= n; j += 4) {
        const char *k0 = KP(j);
        for (int64_t g = 0; g < G; g++) {
            vf a0 = vmul(q[g][0], vload(k0, bf16));
            vf a1 = vmul(q[g][0], vload(k0 + D * esz, bf16));
            vf a2 = vmul(q[g][0], vload(k0 + 2 * D * esz, bf16));
            vf a3 = vmul(q[g][0], vload(k0 + 3 * D * esz, bf16));
            for (int64_t c = 1; c < C; c++) {
                a0 = vfmadd(q[g][c], vload(k0 + c * W * esz, bf16), a0);
                a1 = vfmadd(q[g][c], vload(k0 + (D + c * W) * esz, bf16), a1);
                a2 = vfmadd(q[g][c], vload(k0 + (2 * D + c * W) * esz, bf16), a2);
                a3 = vfmadd(q[g][c], vload(k0 + (3 * D + c * W) * esz, bf16), a3);
            }
            float *sg = s + g * stride + j;
            sg[0] = vsum(a0);
            sg[1] = vsum(a1);
            sg[2] = vsum(a2);
            sg[3] = vsum(a3);
            for (int i = 0; i < 4; i++) mx[g] = sg[i] > mx[g] ? sg[i] : mx[g];
        }
    }
    for (; j < n; j++) {
        vf k[MAXC];
        for (int64_t c = 0; c < C; c++) k[c] = vload(KP(j) + c * W * esz, bf16);
        for (int64_t g = 0; g < G; g++) {
            vf acc = vmul(q[g][0], k[0]);
            for (int64_t c = 1; c < C; c++) acc = vfmadd(q[g][c], k[c], acc);
            float sc = vsum(acc);
            s[g * stride + j] = sc;
            mx[g] = sc > mx[g] ? sc : mx[g];
        }
    }
    /* p_j = e^(s_j - max), W positions at a time (the tail masked: adds exact zeros) */
    for (int64_t g = 0; g < G; g++) {
        float *sg = s + g * stride;
        vf m = vset1(mx[g]), tot = vzero();
        for (int64_t j = 0; j < n; j += W) {
            vf p = vexp_tail(sg + j, m, n - j);
            vstore(sg + j, p);
            tot = vadd(tot, p);
        }
        sum[g] = vsum(tot);
    }
    /* sum_j p_j v_j in position order */
    vf o[MAXG][MAXC];
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < C; c++) o[g][c] = vzero();
    for (int64_t j = 0; j < n; j++) {
        vf v[MAXC];
        for (int64_t c = 0; c < C; c++) v[c] = vload(VP(j) + c * W * esz, bf16);
        for (int64_t g = 0; g < G; g++) {
            vf p = vset1(s[g * stride + j]);
            for (int64_t c = 0; c < C; c++) o[g][c] = vfmadd(p, v[c], o[g][c]);
        }
    }
    for (int64_t g = 0; g < G; g++) {
        vf inv = vset1(1.0f / sum[g]);
        int64_t at = (t * Hq + kh * G + g) * D;
        for (int64_t c = 0; c < C; c++) {
            vf r = vmul(o[g][c], inv);
            if (bf16) {
                float f[W];
                vstore(f, r);
                for (int i = 0; i < W; i++) ((uint16_t *)O)[at + c * W + i] = f32_to_bf16(f[i]);
            } else {
                vstore((float *)O + at + c * W, r);
            }
        }
    }
#undef KP
#undef VP
}

#if defined(__AVX512BF16__)
/* A bf16 token and kv head on a CPU with AVX512-BF16 (the build for it): the same steps as
 * one() with bf16 products on VDPBF16PS, two per fp32 lane per instruction where one() spends
 * an FMA and a widening load on each. A score is q.k_j from the bf16 pairs (each product exact
 * in fp32) in a fixed order -- the pairs of a 32-wide block lane by lane, the blocks in order,
 * the lanes summed by _mm512_reduce_add_ps's tree -- times the scale; the softmax as one(); the
 * output sum_j p_j v_j with p_j rounded to bf16 (torch's flash attention on a CPU rounds its
 * bf16 weights alike) and taken two positions per instruction, (0, 1), (2, 3), ... from logical
 * position 0, an odd last one beside an exact zero; then the division by the fp32 sum of the
 * unrounded p_j and one rounding to bf16. As in one(), a token's bits depend on its query and its
 * slot's positions only. G, C2 = D / 32: constants where called. */
#define MAXC2 (256 / 32)
static inline __attribute__((always_inline)) void one_dp(const void *Q, const void *K, const void *V, void *O,
                                                          const int64_t *slot, const int64_t *nvis, const int64_t *pre,
                                                          const int64_t *aoff, const int64_t *anc, int64_t t,
                                                          int64_t kh, int64_t Hq, const int64_t G, const int64_t C2,
                                                          int64_t qs_t, int64_t qs_h, int64_t ks_slot, int64_t ks_head,
                                                          int64_t stride, float scale, float *s, uint16_t *pb,
                                                          char *kt, char *vt) {
    const int64_t D = C2 * 32, n = nvis[t];
    const char *kb = (const char *)K + (slot[t] * ks_slot + kh * ks_head) * 2;
    const char *vb = (const char *)V + (slot[t] * ks_slot + kh * ks_head) * 2;
    const int64_t b = tree_scratch(kb, vb, pre, aoff, anc, t, n, D * 2, kt, vt);
#define KP(j) ((j) < b ? kb + (j) * D * 2 : kt + ((j) - b) * D * 2)
#define VP(j) ((j) < b ? vb + (j) * D * 2 : vt + ((j) - b) * D * 2)
    __m512bh q[MAXG][MAXC2];
    float mx[MAXG], sum[MAXG];
    const __m128 vscale = _mm_set1_ps(scale);
    for (int64_t g = 0; g < G; g++) {
        const char *qp = (const char *)Q + (t * qs_t + (kh * G + g) * qs_h) * 2;
        for (int64_t c = 0; c < C2; c++) q[g][c] = (__m512bh)_mm512_loadu_si512((const void *)(qp + c * 64));
        mx[g] = -INFINITY;
    }
    /* scores: four positions at a time (blocks of four never straddle b), their keys loaded once
       for the G heads, reduced four at a time by the tree of _mm512_reduce_add_ps; the rest one
       by one with _mm512_reduce_add_ps itself: the same bits for a position either way */
    int64_t j = 0;
    __m128 m4[MAXG];             /* the blocks' running maximum, four lanes (a max is order-free) */
    for (int64_t g = 0; g < G; g++) m4[g] = _mm_set1_ps(-INFINITY);
    for (; j + 4 <= n; j += 4) {
        const char *k0 = KP(j);
        vf a[MAXG][4];
        for (int64_t c = 0; c < C2; c++) {
            __m512bh k4[4];
            for (int i = 0; i < 4; i++) k4[i] = (__m512bh)_mm512_loadu_si512((const void *)(k0 + (i * D + c * 32) * 2));
            for (int64_t g = 0; g < G; g++)
                for (int i = 0; i < 4; i++) a[g][i] = _mm512_dpbf16_ps(c == 0 ? vzero() : a[g][i], q[g][c], k4[i]);
        }
        for (int64_t g = 0; g < G; g++) {
            __m128 s4 = _mm_mul_ps(sums4(a[g][0], a[g][1], a[g][2], a[g][3]), vscale);
            _mm_storeu_ps(s + g * stride + j, s4);
            m4[g] = _mm_max_ps(m4[g], s4);
        }
    }
    for (int64_t g = 0; g < G; g++) mx[g] = max4(m4[g], mx[g]);
    for (; j < n; j++) {
        __m512bh k[MAXC2];
        for (int64_t c = 0; c < C2; c++) k[c] = (__m512bh)_mm512_loadu_si512((const void *)(KP(j) + c * 64));
        for (int64_t g = 0; g < G; g++) {
            vf acc = vzero();
            for (int64_t c = 0; c < C2; c++) acc = _mm512_dpbf16_ps(acc, q[g][c], k[c]);
            float sc = _mm512_reduce_add_ps(acc) * scale;
            s[g * stride + j] = sc;
            mx[g] = sc > mx[g] ? sc : mx[g];
        }
    }
    /* p_j = e^(s_j - max) as one(), summed in fp32, kept rounded to bf16 (zeros past n) */
    for (int64_t g = 0; g < G; g++) {
        float *sg = s + g * stride;
        uint16_t *pg = pb + g * stride;
        vf m = vset1(mx[g]), tot = vzero();
        for (int64_t j = 0; j < n; j += W) {
            vf p = vexp_tail(sg + j, m, n - j);
            _mm256_storeu_si256((__m256i *)(pg + j), vround_bf16(p));
            tot = vadd(tot, p);
        }
        sum[g] = vsum(tot);
    }
    /* sum_j p_j v_j by position pairs: v_j and v_j+1 interleaved (unpacklo / unpackhi: dims
       8l + 0..3 and 8l + 4..7 of each 128-bit lane l), against the pair (p_j, p_j+1) */
    vf o[MAXG][2 * MAXC2];
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < 2 * C2; c++) o[g][c] = vzero();
    for (int64_t j = 0; j < n; j += 2) {
        const char *v0 = VP(j), *v1 = j + 1 < n ? VP(j + 1) : 0;
        for (int64_t c = 0; c < C2; c++) {
            __m512i x0 = _mm512_loadu_si512((const void *)(v0 + c * 64));
            __m512i x1 = v1 ? _mm512_loadu_si512((const void *)(v1 + c * 64)) : _mm512_setzero_si512();
            __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(x0, x1), hi = (__m512bh)_mm512_unpackhi_epi16(x0, x1);
            for (int64_t g = 0; g < G; g++) {
                int32_t pair;
                memcpy(&pair, pb + g * stride + j, 4);
                __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
                o[g][2 * c] = _mm512_dpbf16_ps(o[g][2 * c], pp, lo);
                o[g][2 * c + 1] = _mm512_dpbf16_ps(o[g][2 * c + 1], pp, hi);
            }
        }
    }
    /* back to dimension order, / sum, to bf16 */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t g = 0; g < G; g++) {
        vf inv = vset1(1.0f / sum[g]);
        uint16_t *out = (uint16_t *)O + (t * Hq + kh * G + g) * D;
        for (int64_t c = 0; c < C2; c++) {
            vf r0 = vmul(_mm512_permutex2var_ps(o[g][2 * c], first, o[g][2 * c + 1]), inv);
            vf r1 = vmul(_mm512_permutex2var_ps(o[g][2 * c], second, o[g][2 * c + 1]), inv);
            _mm256_storeu_si256((__m256i *)(out + c * 32), vround_bf16(r0));
            _mm256_storeu_si256((__m256i *)(out + c * 32 + 16), vround_bf16(r1));
        }
    }
#undef KP
#undef VP
}
#endif

/* Q: [T, Hq, D] with element strides qs_t, qs_h (unit along D); K, V: pools [slots, Hkv, L, D]
 * with element strides ks_slot, ks_head (D along a position); O: [T, Hq, D] contiguous; all of
 * one dtype (bf16 when bf16, else fp32). slot[t], nvis[t] >= 1: token t's slot and how many
 * positions it sees; maxvis >= every nvis. Hq / Hkv <= MAXG, D a multiple of 16 <= 256.
 * tree: NULL (every token sees positions [0, nvis[t]) of its slot), or [1 + 2 T + ...] int64:
 * maxanc, then pre[T], aoff[T], anc[...]; token t with pre[t] < nvis[t] (a draft tree's node)
 * sees [0, pre[t]), then the nvis[t] - pre[t] positions anc[aoff[t]], ... in that order (its
 * ancestors, itself last); maxanc >= every nvis - pre.
 * The same instructions compute a (token, head) whatever the constants' dispatch: G and C only
 * unroll the loops. */
void specrag_attention(const void *Q, const void *K, const void *V, void *O, const int64_t *slot,
                       const int64_t *nvis, const int64_t *tree, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                       int64_t qs_t, int64_t qs_h, int64_t ks_slot, int64_t ks_head, int64_t maxvis, float scale,
                       int bf16, int nthreads) {
    const int64_t G = Hq / Hkv, C = D / W, stride = maxvis + W;
    if (T <= 0) return;
    const int64_t maxanc = tree ? tree[0] : 0, *pre = tree ? tree + 1 : 0, *aoff = tree ? tree + 1 + T : 0,
                  *anc = tree ? tree + 1 + 2 * T : 0;
    /* units of at most `chunk` tokens: ~4 per thread per kv head where the tokens allow */
    int64_t chunk = (T * Hkv) / (4 * (int64_t)(nthreads > 0 ? nthreads : 1));
    chunk = chunk < 1 ? 1 : chunk > 32 ? 32 : chunk;
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (T + 1));
    int64_t n = 0;
    for (int64_t t = 0, run = 0; t < T; t++, run++) {
        if (t == 0 || slot[t] != slot[t - 1] || run == chunk) { first[n++] = t; run = 0; }
    }
    first[n] = T;
    #pragma omp parallel num_threads(nthreads)
    {
        float *s = (float *)malloc(sizeof(float) * G * stride);     /* the caller checked the sizes */
#if defined(__AVX512BF16__)
        uint16_t *pb = (uint16_t *)malloc(sizeof(uint16_t) * G * stride);   /* one_dp's bf16 weights */
#endif
        /* a tree node's positions from the multiple of four below its prefix on: keys, values */
        char *kt = pre ? (char *)malloc((size_t)(2 * (maxanc + 4) * D * (bf16 ? 2 : 4))) : 0;
        char *vt = kt ? kt + (maxanc + 4) * D * (bf16 ? 2 : 4) : 0;
        /* a unit: one kv head over a run of consecutive tokens of one slot (at most `chunk`):
           the tokens of a unit read the same keys and values one after another (a slot's head
           at a 700-token context, 179 KB in bf16, stays in L2 instead of being fetched again for
           every token, by each core); units dealt out as threads come free, so a prompt chunk's
           tokens, whose work grows with their position, are spread evenly */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n * Hkv; w++) {
            int64_t kh = w % Hkv, u = w / Hkv;
            for (int64_t t = first[u]; t < first[u + 1]; t++) {
            /* head dims 64 and 128 at 3 or 4 query heads per kv head (SmolLM2, Llama, Qwen) */
#define ONE(g, c, b) one(Q, K, V, O, slot, nvis, pre, aoff, anc, t, kh, Hq, g, c, qs_t, qs_h, ks_slot, ks_head, \
                             stride, scale, b, s, kt, vt)
#if defined(__AVX512BF16__)
#define DP(g, c2) one_dp(Q, K, V, O, slot, nvis, pre, aoff, anc, t, kh, Hq, g, c2, qs_t, qs_h, ks_slot, ks_head, \
                         stride, scale, s, pb, kt, vt)
            if (bf16 && D % 32 == 0) {
                if (G == 3 && D == 64) DP(3, 2);
                else if (G == 4 && D == 64) DP(4, 2);
                else if (G == 4 && D == 128) DP(4, 4);
                else DP(G, D / 32);
                continue;
            }
#undef DP
#endif
            if (G == 3 && D == 64) { if (bf16) ONE(3, 64 / W, 1); else ONE(3, 64 / W, 0); }
            else if (G == 4 && D == 64) { if (bf16) ONE(4, 64 / W, 1); else ONE(4, 64 / W, 0); }
            else if (G == 4 && D == 128) { if (bf16) ONE(4, 128 / W, 1); else ONE(4, 128 / W, 0); }
            else if (bf16) ONE(G, C, 1);
            else ONE(G, C, 0);
#undef ONE
            }
        }
        free(s);
#if defined(__AVX512BF16__)
        free(pb);
#endif
        free(kt);
    }
    free(first);
}
