/* The bf16 product of a linear layer, Y = X W^T (+ b), for CPUs with AVX512-BF16.
 *
 * Why our own: a bf16 decode step is a product of one row against every weight of the model,
 * and verifying a few drafts one of 2-16 rows. torch's bf16 kernels read the weights well below
 * this machine's memory bandwidth at one row, and which kernel torch picks depends on the
 * shape, so a row's bits depend on what shares its product unless the forward splits products
 * into probed blocks.
 *
 * The weights are packed once (``pack``, in speculation/kernels.py) into groups of 32 outputs:
 * Wp[g][k/2][32][2], the two bf16 of a k pair side by side, as VDPBF16PS takes them. Each output
 * is one fp32 lane of an accumulator that VDPBF16PS feeds pair by pair in k order (a row's pair
 * broadcast against 32 outputs' pairs), then the bias in fp32 and one round-to-nearest-even to
 * bf16 (as torch rounds its fp32 accumulation). No horizontal sums, so the same instructions
 * serve 1 row (bound by reading the weights) and hundreds (bound by VDPBF16PS). Every (row m,
 * output n) is reduced by the same instructions whatever the number of rows, so a row's result
 * is bitwise independent of the other rows: the forward is batch-invariant by construction.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define MR 8     /* input rows per pass */
#define MB 64    /* input rows per block (a thread's tile: MB rows x 32 outputs) */
/* A full tile (MR rows) is bound by VDPBF16PS as much as by memory, and without a hint the two
 * took turns (the hardware prefetcher falls behind while the tile computes): it asks for the
 * weights PF_AHEAD bytes ahead, into L2 (AMD EPYC with AVX512-BF16, SmolLM2's bf16 forward at 8 /
 * 12 / 16 tokens: 0.4-2.0 / 0.5-1.8 / 0.2-1.8 ms faster over four alternated runs; at 4-6 tokens
 * no gain). Smaller tiles stream the weights as fast as memory gives them. Prefetches change no
 * result. */
#define PF_AHEAD 6144

static inline __m512bh pair(const uint16_t *x, int64_t kp, int64_t K) {
    int32_t v;
    if (2 * kp + 1 < K) memcpy(&v, x + 2 * kp, 4);
    else v = x[2 * kp];                      /* odd K: the last pair's second half is zero */
    return (__m512bh)_mm512_set1_epi32(v);
}

/* rows m0 .. m0 + mc - 1 of X against the 32 outputs of packed group g, into Y's rows (ldy
 * apart) from column col0 */
static inline __attribute__((always_inline)) void tile(const uint16_t *X, const uint16_t *Wp, const uint16_t *B,
                                                        uint16_t *Y, int64_t K, int64_t N, int64_t sx,
                                                        int64_t m0, const int mc, int64_t g, int64_t ldy,
                                                        int64_t col0) {
    int64_t K2 = (K + 1) / 2;
    const uint16_t *w = Wp + g * K2 * 64;
    __m512 acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < K2; kp++) {
        if (mc == MR) {
            _mm_prefetch((const char *)(w + kp * 64) + PF_AHEAD, _MM_HINT_T1);
            _mm_prefetch((const char *)(w + kp * 64) + PF_AHEAD + 64, _MM_HINT_T1);
        }
        __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(w + kp * 64));
        __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(w + kp * 64 + 32));
        for (int i = 0; i < mc; i++) {
            __m512bh xv = pair(X + (m0 + i) * sx, kp, K);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
        }
    }
    int64_t n0 = g * 32, nc = N - n0 < 32 ? N - n0 : 32;
    for (int i = 0; i < mc; i++) {
        float s[32];
        _mm512_storeu_ps(s, acc[i][0]);
        _mm512_storeu_ps(s + 16, acc[i][1]);
        uint16_t *y = Y + (m0 + i) * ldy + col0 + n0;
        for (int64_t j = 0; j < nc; j++) y[j] = f32_to_bf16(B ? s[j] + bf16_to_f32(B[n0 + j]) : s[j]);
    }
}

/* rows [mb * MB, ...) of X (up to MB) against packed group g of one weight */
static void block(const uint16_t *X, const uint16_t *Wp, const uint16_t *B, uint16_t *Y, int64_t M, int64_t K,
                  int64_t N, int64_t sx, int64_t mb, int64_t g, int64_t ldy, int64_t col0) {
    int64_t m_end = (mb + 1) * MB < M ? (mb + 1) * MB : M;
    for (int64_t m0 = mb * MB; m0 < m_end; m0 += MR) {
        /* constant row counts, so each pass is unrolled; the per-(m, n) reduction is the
           same instructions in all of them */
        switch (m_end - m0 < MR ? m_end - m0 : MR) {
            case 8: tile(X, Wp, B, Y, K, N, sx, m0, 8, g, ldy, col0); break;
            case 7: tile(X, Wp, B, Y, K, N, sx, m0, 7, g, ldy, col0); break;
            case 6: tile(X, Wp, B, Y, K, N, sx, m0, 6, g, ldy, col0); break;
            case 5: tile(X, Wp, B, Y, K, N, sx, m0, 5, g, ldy, col0); break;
            case 4: tile(X, Wp, B, Y, K, N, sx, m0, 4, g, ldy, col0); break;
            case 3: tile(X, Wp, B, Y, K, N, sx, m0, 3, g, ldy, col0); break;
            case 2: tile(X, Wp, B, Y, K, N, sx, m0, 2, g, ldy, col0); break;
            default: tile(X, Wp, B, Y, K, N, sx, m0, 1, g, ldy, col0); break;
        }
    }
}

/* X: [M, K] bf16 with row stride sx (unit stride within a row); Wp: the packed weight of
 * [N, K] (ceil(N / 32) groups of [ceil(K / 2)][32][2], zero past N and K); B: [N] or NULL;
 * Y: [M, N] contiguous. */
void specrag_linear_bf16(const uint16_t *X, const uint16_t *Wp, const uint16_t *B, uint16_t *Y,
                         int64_t M, int64_t K, int64_t N, int64_t sx, int nthreads) {
    int64_t groups = (N + 31) / 32, mblocks = (M + MB - 1) / MB;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < groups * mblocks; t++)
        block(X, Wp, B, Y, M, K, N, sx, t / groups, t % groups, N, 0);
}

/* nw (<= 8) packed weights [Ns[i], K] against one X in one parallel region: Y [M, sum Ns]
 * contiguous, weight i's outputs in its columns after those of the weights before it, each
 * (m, n) by the instructions of specrag_linear_bf16 (bitwise its result). Bs: NULL, or nw
 * pointers each NULL or [Ns[i]]. (The lean loop's q / k / v and gate / up products.) */
void specrag_linear_bf16_multi(const uint16_t *X, int nw, const uint16_t *const *Wps, const uint16_t *const *Bs,
                               const int64_t *Ns, uint16_t *Y, int64_t M, int64_t K, int64_t sx, int nthreads) {
    int64_t first[9], col[9], ldy = 0, mblocks = (M + MB - 1) / MB;
    first[0] = 0;
    for (int i = 0; i < nw; i++) {
        col[i] = ldy;
        ldy += Ns[i];
        first[i + 1] = first[i] + (Ns[i] + 31) / 32;     /* groups before weight i + 1 */
    }
    int64_t groups = first[nw];
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < groups * mblocks; t++) {
        int64_t mb = t / groups, gg = t % groups;
        int i = 0;
        while (gg >= first[i + 1]) i++;
        block(X, Wps[i], Bs ? Bs[i] : 0, Y, M, K, Ns[i], sx, mb, gg - first[i], ldy, col[i]);
    }
}
