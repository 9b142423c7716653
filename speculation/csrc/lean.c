/* The lean forward's layer loop in C (speculation/lean.py): every decoder layer of an fp32 Llama
 * model (or a bf16 one, in the AVX-512 build) for T packed tokens in one call, for CPUs with
 * AVX-512 or with AVX2 + FMA (the same source, built once per instruction set, like attention.c).
 *
 * Why: the loop in Python costs ~7 ms of a 36 ms one-token decode forward of SmolLM2 on a 2-core
 * AMD EPYC (30 layers x ~10 kernel calls through ctypes, slices, views, the MLP's activation in
 * torch): a fifth of the forward, paid again by every verification and batch step.
 *
 * It computes nothing itself but the MLP's activation: the products, the attention, the RMSNorm
 * and the rotary embedding are the very kernels the Python loop calls (linear_f32.c or
 * linear_bf16.c, attention.c, layer.c, each its own build), passed in as function pointers and called with
 * the same arguments in the same order, so a token's result is theirs. The activation,
 * SiLU(gate) * up, is per element, the same instructions whatever T: each token is computed
 * alike whatever else is in the call, and the forward stays batch-invariant.
 */
#include <stdint.h>

#include "bf16.h"
#include "simd.h"

/* the kernels' entry points, their element pointers as void (float, or uint16_t for bf16) */
typedef void (*linear_fn)(const void *X, int nw, const void *const *Ws, const void *const *Bs,
                          const int64_t *Ns, void *Y, int64_t M, int64_t K, int64_t sx, int nthreads);
typedef void (*attention_fn)(const void *Q, const void *K, const void *V, void *O, const int64_t *slot,
                             const int64_t *nvis, const int64_t *tree, int64_t T, int64_t Hq, int64_t Hkv,
                             int64_t D, int64_t qs_t, int64_t qs_h, int64_t ks_slot, int64_t ks_head, int64_t maxvis,
                             float scale, int bf16, int nthreads);
typedef void (*norm_fn)(void *H, const void *Dl, const void *Wt, void *X, int64_t T, int64_t n, float eps);
typedef void (*rope_fn)(void *Q, const void *Kn, const void *Vn, const void *cs, const void *sn, void *Kp,
                        void *Vp, const int64_t *slot, const int64_t *pos, int64_t T, int64_t Hq, int64_t Hkv,
                        int64_t D, int64_t sq, int64_t skv, int64_t ps_slot, int64_t ps_head);

#if defined(__AVX512F__)
static inline vf vnegabs(vf x) {        /* -|x| */
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u)));
}
static inline vf vsel_nonneg(vf x, vf a, vf b) {     /* a where x >= 0, else b */
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ), b, a);
}
#define vdiv(a, b) _mm512_div_ps(a, b)
#else
static inline vf vnegabs(vf x) { return _mm256_or_ps(x, _mm256_set1_ps(-0.0f)); }
static inline vf vsel_nonneg(vf x, vf a, vf b) {
    return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
}
#define vdiv(a, b) _mm256_div_ps(a, b)
#endif

/* SiLU of W gate values: x * sigmoid(x), sigmoid from e = e^-|x| (in (0, 1], no overflow):
 * 1 / (1 + e) for x >= 0, e / (1 + e) below; times the up values */
static inline vf silu(vf x) {
    vf e = vexp(vnegabs(x));
    vf r = vdiv(vset1(1.0f), vadd(vset1(1.0f), e));
    return vmul(x, vsel_nonneg(x, r, vmul(e, r)));
}
static inline vf silu_mul(vf x, vf u) { return vmul(silu(x), u); }

/* P[t, i] = SiLU(G[t, i]) * G[t, n + i] for the T rows of G [T, 2n] (gate | up, one fused
 * product's output) into P [T, n]; a row's tail past the last whole vector through a zero-padded
 * vector, so every element is computed by the same instructions */
void specrag_silu_mul(const float *G, float *P, int64_t T, int64_t n, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (T * n >= 8192)
    for (int64_t t = 0; t < T; t++) {
        const float *g = G + t * 2 * n, *u = g + n;
        float *p = P + t * n;
        int64_t i = 0;
        for (; i + W <= n; i += W) vstore(p + i, silu_mul(vload((const char *)(g + i), 0), vload((const char *)(u + i), 0)));
        if (i < n) {
            float a[W] = {0}, b[W] = {0}, c[W];
            for (int64_t j = 0; i + j < n; j++) a[j] = g[i + j], b[j] = u[i + j];
            vstore(c, silu_mul(vload((const char *)a, 0), vload((const char *)b, 0)));
            for (int64_t j = 0; i + j < n; j++) p[i + j] = c[j];
        }
    }
}

#if defined(__AVX512F__)
/* W bf16 values at g and u, rounded where transformers' bf16 MLP rounds: bf16(bf16(SiLU(gate)) *
 * up), the SiLU of silu() above in fp32 (simd.h's vload widens bf16 to fp32; bf16.h's
 * vround_bf16 rounds) */
static inline __m256i silu_mul_bf16(const uint16_t *g, const uint16_t *u) {
    __m256i s = vround_bf16(silu(vload((const char *)g, 1)));
    return vround_bf16(vmul(vload((const char *)&s, 1), vload((const char *)u, 1)));
}

void specrag_silu_mul_bf16(const uint16_t *G, uint16_t *P, int64_t T, int64_t n, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (T * n >= 8192)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *g = G + t * 2 * n, *u = g + n;
        uint16_t *p = P + t * n;
        int64_t i = 0;
        for (; i + W <= n; i += W) _mm256_storeu_si256((__m256i *)(p + i), silu_mul_bf16(g + i, u + i));
        if (i < n) {
            uint16_t a[W] = {0}, b[W] = {0}, c[W];
            for (int64_t j = 0; i + j < n; j++) a[j] = g[i + j], b[j] = u[i + j];
            _mm256_storeu_si256((__m256i *)c, silu_mul_bf16(a, b));
            for (int64_t j = 0; i + j < n; j++) p[i + j] = c[j];
        }
    }
}
#endif

/* The L decoder layers for T packed tokens, then the final RMSNorm; every tensor of one dtype,
 * fp32 or (bf16 != 0) bf16, whose kernels lin / norm / rope are.
 * dims: hidden, query width (Hq * D), kv width (Hkv * D), MLP width, head dim D.
 * wts: per layer 9 pointers -- input norm, q, k, v, o, post-attention norm, gate, up, down --
 *      then the final norm's (bf16: the linear weights packed as linear_bf16.c reads them);
 *      bias: per layer 7 (q, k, v, o, gate, up, down), each NULL or [N];
 *      eps: per layer 2, then the final norm's.
 * keys, values: per layer the pool [slots, Hkv, Lmax, D] (element strides ps_slot, ps_head);
 * slot, pos, nvis: [T] int64, token t written at (slot, pos) and seeing [0, nvis) of its slot;
 * tree: NULL, or draft-tree nodes' visible positions as attention.c takes them;
 * cs, sn: [T, D] its rotary cos and sin.
 * H [T, hidden]: the embeddings in, the residual stream out; X [T, hidden]: the final norm's
 * output; scratch Y [T, q + 2 kv], A [T, q], Gt [T, 2 MLP], P [T, MLP], Dn [T, hidden]. */
static void layers(linear_fn lin, attention_fn attn, norm_fn norm, rope_fn rope, int64_t L, int64_t T,
                   const int64_t *dims, const void *const *wts, const void *const *bias, const float *eps,
                   void *const *keys, void *const *values, int64_t ps_slot, int64_t ps_head, const int64_t *slot,
                   const int64_t *pos, const int64_t *nvis, const int64_t *tree, int64_t maxvis, float scale,
                   const void *cs, const void *sn, void *H, void *X, void *Y, void *A, void *Gt, void *P, void *Dn,
                   int nthreads, int bf16) {
    const int64_t hid = dims[0], nq = dims[1], nkv = dims[2], inter = dims[3], D = dims[4];
    const int64_t ldy = nq + 2 * nkv, Hq = nq / D, Hkv = nkv / D, esz = bf16 ? 2 : 4;
    const int64_t qkv_n[3] = {nq, nkv, nkv}, gu_n[2] = {inter, inter}, o_n = hid, down_n = hid;
    char *y = (char *)Y;
    for (int64_t l = 0; l < L; l++) {
        const void *const *w = wts + l * 9, *const *b = bias + l * 7;
        norm(H, l ? Dn : 0, w[0], X, T, hid, eps[2 * l]);
        lin(X, 3, w + 1, b, qkv_n, Y, T, hid, hid, nthreads);
        rope(Y, y + nq * esz, y + (nq + nkv) * esz, cs, sn, keys[l], values[l], slot, pos, T, Hq, Hkv, D, ldy, ldy,
             ps_slot, ps_head);
        attn(Y, keys[l], values[l], A, slot, nvis, tree, T, Hq, Hkv, D, ldy, D, ps_slot, ps_head, maxvis, scale, bf16,
             nthreads);
        lin(A, 1, w + 4, b + 3, &o_n, Dn, T, nq, nq, nthreads);
        norm(H, Dn, w[5], X, T, hid, eps[2 * l + 1]);
        lin(X, 2, w + 6, b + 4, gu_n, Gt, T, hid, hid, nthreads);
#if defined(__AVX512F__)
        if (bf16) specrag_silu_mul_bf16((const uint16_t *)Gt, (uint16_t *)P, T, inter, nthreads);
        else
#endif
        specrag_silu_mul((const float *)Gt, (float *)P, T, inter, nthreads);
        lin(P, 1, w + 8, b + 6, &down_n, Dn, T, inter, inter, nthreads);
    }
    norm(H, L ? Dn : 0, wts[L * 9], X, T, hid, eps[2 * L]);
}

void specrag_lean_layers(linear_fn lin, attention_fn attn, norm_fn norm, rope_fn rope, int64_t L, int64_t T,
                         const int64_t *dims, const void *const *wts, const void *const *bias, const float *eps,
                         void *const *keys, void *const *values, int64_t ps_slot, int64_t ps_head,
                         const int64_t *slot, const int64_t *pos, const int64_t *nvis, const int64_t *tree,
                         int64_t maxvis, float scale,
                         const void *cs, const void *sn, void *H, void *X, void *Y, void *A, void *Gt, void *P,
                         void *Dn, int nthreads) {
    layers(lin, attn, norm, rope, L, T, dims, wts, bias, eps, keys, values, ps_slot, ps_head, slot, pos, nvis, tree,
           maxvis, scale, cs, sn, H, X, Y, A, Gt, P, Dn, nthreads, 0);
}

#if defined(__AVX512F__)
/* the same for a bf16 model (its kernels: linear_bf16.c's multi product, layer.c's _bf16 ops) */
void specrag_lean_layers_bf16(linear_fn lin, attention_fn attn, norm_fn norm, rope_fn rope, int64_t L, int64_t T,
                              const int64_t *dims, const void *const *wts, const void *const *bias, const float *eps,
                              void *const *keys, void *const *values, int64_t ps_slot, int64_t ps_head,
                              const int64_t *slot, const int64_t *pos, const int64_t *nvis, const int64_t *tree,
                              int64_t maxvis,
                              float scale, const void *cs, const void *sn, void *H, void *X, void *Y, void *A,
                              void *Gt, void *P, void *Dn, int nthreads) {
    layers(lin, attn, norm, rope, L, T, dims, wts, bias, eps, keys, values, ps_slot, ps_head, slot, pos, nvis, tree,
           maxvis, scale, cs, sn, H, X, Y, A, Gt, P, Dn, nthreads, 1);
}
#endif
