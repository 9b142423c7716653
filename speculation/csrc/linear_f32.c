/* The fp32 product of a linear layer, Y = X W^T (+ b), for CPUs with AVX-512 or with AVX2 + FMA
 * (the same source, built once per instruction set: 16 or 8 fp32 lanes).
 *
 * Why our own: torch's fp32 GEMM (MKL) streams the weights at half this machine's memory
 * bandwidth for one row and gets slower per row from 2 to ~8 rows (measured on an AMD EPYC:
 * SmolLM2's 30 layers take 33 ms at 1 row, 46-51 ms at 2-4), which is exactly the shape of
 * decoding and of verifying a few drafted tokens. And it takes another path for one row than
 * for several, so a token's result depended on how many shared its forward.
 *
 * Here every (row m, output n) is reduced the same way whatever the number of rows: one W-lane
 * FMA accumulator over k in steps of W, a fixed horizontal sum, the k tail in order, then the
 * bias. So a row's result is bitwise independent of the other rows (batch-invariant by
 * construction), and the weights are read once per block of MB rows: tiles of NR weight rows
 * stay in L1 while up to MR input rows at a time pass them, MR x NR accumulators in registers
 * (AVX-512's 32 registers hold 4 x 6, AVX2's 16 hold 3 x 4). The tile shape changes how fast,
 * never what: each accumulator is its own chain. (The two builds differ from each other in the
 * last bits; a machine runs one.)
 */
#include <immintrin.h>
#include <stdint.h>

#define MB 96    /* input rows per block */

#if defined(__AVX512F__)
#define W 16
#define MR 4     /* input rows per tile */
#define NR 6     /* weight rows per tile */
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vfmadd(a, b, c) _mm512_fmadd_ps(a, b, c)

static inline float hsum(vf v) {       /* a fixed order: halves of 256, then as AVX2's below */
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),      /* AVX512F alone: the high half as 4 doubles */
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}
#else
#define W 8
#define MR 3
#define NR 4
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vfmadd(a, b, c) _mm256_fmadd_ps(a, b, c)

static inline float hsum(vf v) {       /* a fixed order: halves, then pairs, then the last two */
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}
#endif

/* rows m0 .. m0 + mc - 1 (mc <= MR) of X against weight rows n0 .. n0 + nc - 1 (nc <= NR), into
 * columns n0 .. of Y (leading dimension ldy) */
static inline void tile(const float *X, const float *W_, const float *B, float *Y, int64_t K, int64_t ldy,
                        int64_t sx, int64_t m0, int mc, int64_t n0, int64_t nc, const float *next) {
    vf acc[MR][NR];
    const float *w[NR];
    const float *x[MR];
    int64_t kw = K - K % W;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = vzero();
    for (int j = 0; j < NR; j++) w[j] = W_ + (n0 + (j < nc ? j : 0)) * K;
    for (int i = 0; i < MR; i++) x[i] = X + (m0 + (i < mc ? i : 0)) * sx;
    for (int64_t k = 0; k < kw; k += W) {
        vf xv[MR];
        for (int i = 0; i < mc; i++) xv[i] = vload(x[i] + k);
        if (next)
            for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(next + j * K + k), _MM_HINT_T0);
        for (int j = 0; j < NR; j++) {
            vf wv = vload(w[j] + k);
            for (int i = 0; i < mc; i++) acc[i][j] = vfmadd(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < mc; i++) {
        for (int j = 0; j < nc; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t k = kw; k < K; k++) s = __builtin_fmaf(x[i][k], w[j][k], s);
            if (B) s += B[n0 + j];
            Y[(m0 + i) * ldy + n0 + j] = s;
        }
    }
}

/* Products of one input with several weights (the query, key and value projections; the
 * gate and up projections), side by side in one output, in one parallel region: each weight's
 * columns bitwise those of its own product. X: [M, K] with row stride sx (unit stride within a
 * row); Ws[w]: [Ns[w], K] contiguous; Bs: NULL or Bs[w]: [Ns[w]] or NULL; Y: [M, sum of Ns]
 * contiguous, weight w's columns after those of the weights before it. */
void specrag_linear_f32_multi(const float *X, int nw, const float *const *Ws, const float *const *Bs,
                              const int64_t *Ns, float *Y, int64_t M, int64_t K, int64_t sx, int nthreads) {
    int64_t first[9] = {0}, col[9] = {0};      /* weight w's first tile, first output column */
    if (nw < 1 || nw > 8) return;           /* the caller (LinearKernel.linear_multi) keeps to 1..8 */
    for (int w = 0; w < nw; w++) {
        first[w + 1] = first[w] + (Ns[w] + NR - 1) / NR;
        col[w + 1] = col[w] + Ns[w];
    }
    int64_t ntiles = first[nw], mblocks = (M + MB - 1) / MB, ldy = col[nw];
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < ntiles * mblocks; t++) {
        int64_t mb = t / ntiles, tw = t % ntiles;
        int w = 0;
        while (tw >= first[w + 1]) w++;
        const float *W_ = Ws[w], *B = Bs ? Bs[w] : 0;
        int64_t N = Ns[w], n0 = (tw - first[w]) * NR;
        int64_t nc = N - n0 < NR ? N - n0 : NR;
        int64_t m_end = (mb + 1) * MB < M ? (mb + 1) * MB : M;
        /* the next tile's weights (the next NR rows, contiguous; the next weight's first),
           fetched into L1 while this tile computes: without it a tile waits for its weights,
           then computes with the memory idle (1-8 rows of SmolLM2's products ~7-15% faster on
           a Xeon) */
        const float *next = n0 + 2 * NR <= N ? W_ + (n0 + NR) * K
                          : n0 + NR >= N && w + 1 < nw && Ns[w + 1] >= NR ? Ws[w + 1] : 0;
        float *Yw = Y + col[w];
        for (int64_t m0 = mb * MB; m0 < m_end; m0 += MR) {
            int64_t left = m_end - m0;
            /* constant row counts, so each tile is unrolled; the per-(m, n) reduction is the
               same instructions in all of them */
            if (left >= MR) tile(X, W_, B, Yw, K, ldy, sx, m0, MR, n0, nc, next);
#if MR > 3
            else if (left == 3) tile(X, W_, B, Yw, K, ldy, sx, m0, 3, n0, nc, next);
#endif
            else if (left == 2) tile(X, W_, B, Yw, K, ldy, sx, m0, 2, n0, nc, next);
            else tile(X, W_, B, Yw, K, ldy, sx, m0, 1, n0, nc, next);
        }
    }
}

/* One product: X: [M, K] with row stride sx (unit stride within a row); W: [N, K] contiguous;
 * B: [N] or NULL; Y: [M, N] contiguous. */
void specrag_linear_f32(const float *X, const float *W_, const float *B, float *Y,
                        int64_t M, int64_t K, int64_t N, int64_t sx, int nthreads) {
    specrag_linear_f32_multi(X, 1, &W_, B ? &B : 0, &N, Y, M, K, sx, nthreads);
}
