/* The small operations of a Llama decoder layer in fp32 and in bf16, for the lean forward
 * (speculation/lean.py): the residual add with the RMSNorm after it, and the rotary embedding of
 * the new queries and keys with the keys' and values' write into the KV pool.
 *
 * Why our own: in torch these are ~25 operators per layer (pow, mean, rsqrt, casts, slices,
 * negations, concatenations, index writes), each a few microseconds of dispatch; with the
 * module calls around them they cost ~30 ms of a 68 ms fp32 decode forward of SmolLM2 on a
 * 2-core AMD EPYC, more than the attention. Here they are two calls per layer.
 *
 * Every token is computed by the same scalar instructions in the same order whatever else is
 * in the call (no vector reductions whose shape depends on the call; from PAR_T tokens on, the
 * tokens are dealt out to the OpenMP threads -- torch's count, the caller's ICV -- which changes
 * only which core computes a token): a token's result depends on its own inputs only, so the
 * forward stays batch-invariant.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define PAR_T 8     /* tokens from which a call is split over the threads (~2 us of work each) */

/* H[t] += Dl[t] (when Dl is not NULL), then X[t] = Wt * (H[t] / sqrt(mean(H[t]^2) + eps)), for
 * the T rows of n values (all contiguous). The sum of squares in 8 interleaved partial sums,
 * added pairwise at the end: a fixed order. */
void specrag_add_rmsnorm(float *H, const float *Dl, const float *Wt, float *X, int64_t T, int64_t n, float eps) {
    #pragma omp parallel for schedule(static) if (T >= PAR_T)
    for (int64_t t = 0; t < T; t++) {
        float *h = H + t * n, *x = X + t * n;
        if (Dl) {
            const float *d = Dl + t * n;
            for (int64_t i = 0; i < n; i++) h[i] = h[i] + d[i];
        }
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            for (int j = 0; j < 8; j++) acc[j] += h[i + j] * h[i + j];
        for (; i < n; i++) acc[0] += h[i] * h[i];
        float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        float r = 1.0f / sqrtf(s / (float)n + eps);
        for (i = 0; i < n; i++) x[i] = Wt[i] * (h[i] * r);
    }
}

/* Rotary embedding (the rotate-half form) of token t's Hq query heads in place, and of its Hkv
 * key heads into the pool at (slot[t], pos[t]), where its value heads are copied too.
 * Q: [T, Hq * D] with rows sq elements apart, Kn, Vn: [T, Hkv * D] with rows skv apart (they may
 * be column blocks of one fused product), each row contiguous; cs, sn: [T, D] (the token's cos and sin), contiguous;
 * Kp, Vp: pools [slots, Hkv, L, D] with element strides ps_slot, ps_head. */
static inline void rope(float *out, const float *in, const float *c, const float *s, int64_t D) {
    int64_t h = D / 2;
    for (int64_t i = 0; i < h; i++) {
        float a = in[i], b = in[i + h];
        out[i] = a * c[i] - b * s[i];
        out[i + h] = b * c[i + h] + a * s[i + h];
    }
}

void specrag_rope_kv(float *Q, const float *Kn, const float *Vn, const float *cs, const float *sn, float *Kp,
                     float *Vp, const int64_t *slot, const int64_t *pos, int64_t T, int64_t Hq, int64_t Hkv,
                     int64_t D, int64_t sq, int64_t skv, int64_t ps_slot, int64_t ps_head) {
    #pragma omp parallel for schedule(static) if (T >= PAR_T)
    for (int64_t t = 0; t < T; t++) {
        float tmp[512];
        const float *c = cs + t * D, *s = sn + t * D;
        for (int64_t hd = 0; hd < Hq; hd++) {
            float *q = Q + t * sq + hd * D;
            rope(tmp, q, c, s, D);
            for (int64_t i = 0; i < D; i++) q[i] = tmp[i];
        }
        for (int64_t hd = 0; hd < Hkv; hd++) {
            int64_t at = slot[t] * ps_slot + hd * ps_head + pos[t] * D;
            rope(Kp + at, Kn + t * skv + hd * D, c, s, D);
            const float *v = Vn + t * skv + hd * D;
            for (int64_t i = 0; i < D; i++) Vp[at + i] = v[i];
        }
    }
}


/* The same in bf16, rounding where transformers' bf16 modules round (each torch operator on bf16
 * tensors computes in fp32 and rounds its result to bf16): h = bf16(h + d); the sum of squares
 * of h in fp32 (the fp32 version's order); X = bf16(Wt * bf16(h * r)) (LlamaRMSNorm: the
 * normalised row cast to bf16, then times the bf16 weight). */
void specrag_add_rmsnorm_bf16(uint16_t *H, const uint16_t *Dl, const uint16_t *Wt, uint16_t *X, int64_t T,
                              int64_t n, float eps) {
    #pragma omp parallel for schedule(static) if (T >= PAR_T)
    for (int64_t t = 0; t < T; t++) {
        uint16_t *h = H + t * n, *x = X + t * n;
        if (Dl) {
            const uint16_t *d = Dl + t * n;
            for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(d[i]));
        }
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            for (int j = 0; j < 8; j++) {
                float v = bf16_to_f32(h[i + j]);
                acc[j] += v * v;
            }
        for (; i < n; i++) {
            float v = bf16_to_f32(h[i]);
            acc[0] += v * v;
        }
        float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        float r = 1.0f / sqrtf(s / (float)n + eps);
        for (i = 0; i < n; i++) {
            float y = bf16_to_f32(f32_to_bf16(bf16_to_f32(h[i]) * r));
            x[i] = f32_to_bf16(bf16_to_f32(Wt[i]) * y);
        }
    }
}

static inline float mul_bf16(uint16_t a, uint16_t b) {      /* a bf16 product, as a float */
    return bf16_to_f32(f32_to_bf16(bf16_to_f32(a) * bf16_to_f32(b)));
}

/* transformers' apply_rotary_pos_emb on bf16 tensors: q * cos + rotate_half(q) * sin, each
 * product and the sum rounded to bf16 (-b * s rounds to -(b * s): rounding is symmetric) */
static inline void rope_bf16(uint16_t *out, const uint16_t *in, const uint16_t *c, const uint16_t *s, int64_t D) {
    int64_t h = D / 2;
    for (int64_t i = 0; i < h; i++) {
        uint16_t a = in[i], b = in[i + h];
        out[i] = f32_to_bf16(mul_bf16(a, c[i]) + -mul_bf16(b, s[i]));
        out[i + h] = f32_to_bf16(mul_bf16(b, c[i + h]) + mul_bf16(a, s[i + h]));
    }
}

/* specrag_rope_kv for bf16 tensors and pools (cs, sn: the bf16 cos and sin transformers' rotary
 * module returns for a bf16 model) */
void specrag_rope_kv_bf16(uint16_t *Q, const uint16_t *Kn, const uint16_t *Vn, const uint16_t *cs,
                          const uint16_t *sn, uint16_t *Kp, uint16_t *Vp, const int64_t *slot, const int64_t *pos,
                          int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t sq, int64_t skv, int64_t ps_slot,
                          int64_t ps_head) {
    #pragma omp parallel for schedule(static) if (T >= PAR_T)
    for (int64_t t = 0; t < T; t++) {
        uint16_t tmp[512];
        const uint16_t *c = cs + t * D, *s = sn + t * D;
        for (int64_t hd = 0; hd < Hq; hd++) {
            uint16_t *q = Q + t * sq + hd * D;
            rope_bf16(tmp, q, c, s, D);
            for (int64_t i = 0; i < D; i++) q[i] = tmp[i];
        }
        for (int64_t hd = 0; hd < Hkv; hd++) {
            int64_t at = slot[t] * ps_slot + hd * ps_head + pos[t] * D;
            rope_bf16(Kp + at, Kn + t * skv + hd * D, c, s, D);
            const uint16_t *v = Vn + t * skv + hd * D;
            for (int64_t i = 0; i < D; i++) Vp[at + i] = v[i];
        }
    }
}
