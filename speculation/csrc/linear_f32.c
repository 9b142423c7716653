/* The fp32 product of a linear layer, Y = X W^T (+ b), for CPUs with AVX2 and FMA.
 *
 * Why our own: torch's fp32 GEMM (MKL) streams the weights at half this machine's memory
 * bandwidth for one row and gets slower per row from 2 to ~8 rows (measured on an AMD EPYC:
 * SmolLM2's 30 layers take 33 ms at 1 row, 46-51 ms at 2-4), which is exactly the shape of
 * decoding and of verifying a few drafted tokens. And it takes another path for one row than
 * for several, so a token's result depended on how many shared its forward.
 *
 * Here every (row m, output n) is reduced the same way whatever the number of rows: one 8-lane
 * FMA accumulator over k in steps of 8, a fixed horizontal sum, the k tail in order, then the
 * bias. So a row's result is bitwise independent of the other rows (batch-invariant by
 * construction), and the weights are read once per block of MB rows: tiles of NB weight rows
 * stay in L1 while up to 3 input rows at a time pass them.
 */
#include <immintrin.h>
#include <stdint.h>

#define NB 4     /* weight rows per tile */
#define MB 96    /* input rows per block */

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* rows m0 .. m0 + mc - 1 (mc <= 3) of X against weight rows n0 .. n0 + nc - 1 (nc <= NB) */
static inline void tile(const float *X, const float *W, const float *B, float *Y, int64_t K, int64_t N,
                        int64_t sx, int64_t m0, int mc, int64_t n0, int64_t nc) {
    __m256 acc[3][NB];
    const float *w[NB];
    int64_t k8 = K & ~(int64_t)7;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();
    for (int j = 0; j < NB; j++) w[j] = W + (n0 + (j < nc ? j : 0)) * K;
    for (int64_t k = 0; k < k8; k += 8) {
        __m256 wv[NB];
        for (int j = 0; j < NB; j++) wv[j] = _mm256_loadu_ps(w[j] + k);
        for (int i = 0; i < mc; i++) {
            __m256 xv = _mm256_loadu_ps(X + (m0 + i) * sx + k);
            for (int j = 0; j < NB; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mc; i++) {
        const float *x = X + (m0 + i) * sx;
        for (int j = 0; j < nc; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t k = k8; k < K; k++) s = __builtin_fmaf(x[k], w[j][k], s);
            if (B) s += B[n0 + j];
            Y[(m0 + i) * N + n0 + j] = s;
        }
    }
}

/* X: [M, K] with row stride sx (unit stride within a row); W: [N, K] contiguous; B: [N] or
 * NULL; Y: [M, N] contiguous. */
void specrag_linear_f32(const float *X, const float *W, const float *B, float *Y,
                        int64_t M, int64_t K, int64_t N, int64_t sx, int nthreads) {
    int64_t ntiles = (N + NB - 1) / NB, mblocks = (M + MB - 1) / MB;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < ntiles * mblocks; t++) {
        int64_t mb = t / ntiles, n0 = (t % ntiles) * NB;
        int64_t nc = N - n0 < NB ? N - n0 : NB;
        int64_t m_end = (mb + 1) * MB < M ? (mb + 1) * MB : M;
        for (int64_t m0 = mb * MB; m0 < m_end; m0 += 3) {
            int64_t left = m_end - m0;
            /* constant row counts, so each tile is unrolled; the per-(m, n) reduction is the
               same instructions in all three */
            if (left >= 3) tile(X, W, B, Y, K, N, sx, m0, 3, n0, nc);
            else if (left == 2) tile(X, W, B, Y, K, N, sx, m0, 2, n0, nc);
            else tile(X, W, B, Y, K, N, sx, m0, 1, n0, nc);
        }
    }
}
