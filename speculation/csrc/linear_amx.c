/* The bf16 product of a linear layer, Y = X W^T (+ b), on AMX tiles (Intel Xeon with AMX-BF16).
 *
 * Why: linear_bf16.c's VDPBF16PS kernel reads the weights at the cache's speed for one row but
 * is bound by VDPBF16PS from about 4 rows on (~200 GFLOP/s on 2 cores of a Xeon with AMX), so
 * verifying drafts or stepping 16 sequences costs several one-row products. TDPBF16PS does a
 * 16 x 16 x 32 block per instruction: 16 rows cost about what one row costs (the weights' reads
 * bound both), and torch's own AMX GEMM reaches ~1,400 GFLOP/s at 128 rows here. torch's GEMM
 * picks its path by shape, though (a row's bits depend on what shares its product); this kernel
 * computes every (row m, output n) with the same instructions whatever the number of rows.
 *
 * The weights are packed as for linear_bf16.c (speculation/kernels.py ``pack``): groups of 32
 * outputs, Wp[g][k/2][32][2], the two bf16 of a k pair side by side, here with k padded with
 * zeros to a multiple of 32. A B tile is 16 k pairs x 16 outputs of that layout (rows 128 bytes
 * apart). Up to 16 rows with K a multiple of 32 (a decode step, a row's drafts), the A tiles are
 * X's rows in place, the tiles configured to M rows; else X's rows are copied into a zero-padded
 * [ceil(M/16) * 16][ceil(K/32) * 32] buffer, so every A tile is 16 whole rows (pad rows are
 * computed and dropped). Each output element is one
 * fp32 element of a C tile that TDPBF16PS feeds 32 k (16 pairs) at a time in k order, from zero;
 * then the bias in fp32 and one round-to-nearest-even to bf16 (as torch rounds its fp32
 * accumulation, and as linear_bf16.c does). A row's result is bitwise independent of the other
 * rows: the forward stays batch-invariant by construction. (TDPBF16PS's own rounding is not
 * VDPBF16PS's: this kernel's results are not bitwise linear_bf16.c's. One machine runs one of
 * them, for every product.)
 *
 * Linux hands out the AMX tile state only to a process that asks for it: specrag_amx_init.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 0 once this process may use the AMX tiles (asked of the kernel once; idempotent) */
int specrag_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

/* tiles 0-3: C (2 row blocks x 2 output halves), 4-5: A (a row block each): `rows` rows; 6-7: B,
 * 16 rows (k pairs); every row 64 bytes */
static void configure(int rows) {
    tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = i < 6 ? rows : 16;
    }
    _tile_loadconfig(&c);
}

/* n (<= 16) fp32 -> bf16 as bf16.h's f32_to_bf16 rounds (RNE, NaN kept quiet), the bias (n
 * bf16 or NULL) added in fp32 first */
static inline void store_row(uint16_t *y, const float *s, const uint16_t *b, int n) {
    __m512 v = _mm512_loadu_ps(s);
    if (b) {
        __m256i bb = n == 16 ? _mm256_loadu_si256((const __m256i *)b) : _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), b);
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bb), 16)));
    }
    __m256i h = vround_bf16(v);
    if (n == 16) _mm256_storeu_si256((__m256i *)y, h);
    else _mm256_mask_storeu_epi16(y, (__mmask16)((1u << n) - 1), h);
}

/* rows [m0, m0 + 32) of X (row stride sx; the second block of 16 only if two) against packed
 * group g of one weight, written to Y's rows m0 .. M - 1 (ldy apart) from column col0 */
static void unit(const uint16_t *X, int64_t sx, int64_t Kp, const uint16_t *Wp, const uint16_t *B, uint16_t *Y,
                 int64_t M, int64_t N, int64_t m0, int two, int64_t g, int64_t ldy, int64_t col0) {
    const uint16_t *w = Wp + g * (Kp / 2) * 64;
    const uint16_t *x0 = X + m0 * sx, *x1 = x0 + 16 * sx;
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k = 0; k < Kp; k += 32) {
        _tile_loadd(4, x0 + k, sx * 2);
        _tile_loadd(6, w + k * 32, 128);            /* pairs k/2 .. k/2 + 15, outputs 0-15 */
        _tile_loadd(7, w + k * 32 + 32, 128);       /* outputs 16-31 */
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
            _tile_loadd(5, x1 + k, sx * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    float s[32][32];
    _tile_stored(0, &s[0][0], 128);
    _tile_stored(1, &s[0][16], 128);
    if (two) {
        _tile_stored(2, &s[16][0], 128);
        _tile_stored(3, &s[16][16], 128);
    }
    int64_t n0 = g * 32, nc = N - n0 < 32 ? N - n0 : 32;
    int64_t rows = M - m0 < (two ? 32 : 16) ? M - m0 : (two ? 32 : 16);
    for (int64_t i = 0; i < rows; i++) {
        uint16_t *y = Y + (m0 + i) * ldy + col0 + n0;
        store_row(y, s[i], B ? B + n0 : 0, nc < 16 ? (int)nc : 16);
        if (nc > 16) store_row(y + 16, s[i] + 16, B ? B + n0 + 16 : 0, (int)(nc - 16));
    }
}

/* X [M, K] (row stride sx) copied into a zeroed [ceil(M/16)*16, Kp] buffer */
static uint16_t *pad_rows(const uint16_t *X, int64_t M, int64_t K, int64_t sx, int64_t Kp) {
    int64_t Mp = (M + 15) / 16 * 16;
    uint16_t *Xp = aligned_alloc(64, (size_t)(Mp * Kp * 2 + 63) / 64 * 64);
    if (!Xp) {          /* a few KB for a decode step: no wrong output, the process is out of memory */
        fprintf(stderr, "specrag_linear_bf16 (AMX): out of memory for a %lld x %lld copy\n", (long long)Mp, (long long)Kp);
        abort();
    }
    for (int64_t m = 0; m < Mp; m++) {
        uint16_t *d = Xp + m * Kp;
        if (m < M) {
            memcpy(d, X + m * sx, (size_t)K * 2);
            memset(d + K, 0, (size_t)(Kp - K) * 2);
        } else {
            memset(d, 0, (size_t)Kp * 2);
        }
    }
    return Xp;
}

/* nw (<= 8) packed weights [Ns[i], K] against one X: Y [M, ldy], weight i's outputs from column
 * col[i]; work units (32 rows, one group of 32 outputs of one weight) dealt statically. Up to 16
 * rows with K a multiple of 32, the A tiles are X's own rows (the tiles configured to M rows);
 * else a zero-padded copy of X, every tile 16 rows. */
static void product(const uint16_t *X, int nw, const uint16_t *const *Wps, const uint16_t *const *Bs, const int64_t *Ns,
                   const int64_t *col, int64_t ldy, uint16_t *Y, int64_t M, int64_t K, int64_t sx, int nthreads) {
    int64_t Kp = (K + 31) / 32 * 32, first[9], mblocks = (M + 31) / 32;
    int direct = M <= 16 && Kp == K;
    uint16_t *Xp = direct ? 0 : pad_rows(X, M, K, sx, Kp);
    const uint16_t *A = direct ? X : Xp;
    int64_t sa = direct ? sx : Kp;
    first[0] = 0;
    for (int i = 0; i < nw; i++) first[i + 1] = first[i] + (Ns[i] + 31) / 32;
    int64_t groups = first[nw];
    #pragma omp parallel num_threads(nthreads)
    {
        configure(direct ? (int)M : 16);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < groups * mblocks; t++) {
            int64_t mb = t / groups, gg = t % groups;
            int i = 0;
            while (gg >= first[i + 1]) i++;
            unit(A, sa, Kp, Wps[i], Bs ? Bs[i] : 0, Y, M, Ns[i], mb * 32, M - mb * 32 > 16, gg - first[i], ldy, col[i]);
        }
        _tile_release();
    }
    free(Xp);
}

/* X: [M, K] bf16 with row stride sx (unit stride within a row); Wp: the packed weight of [N, K]
 * (ceil(N / 32) groups of [ceil(K / 32) * 16][32][2], zero past N and K); B: [N] or NULL; Y:
 * [M, N] contiguous. The signature of linear_bf16.c's. */
void specrag_linear_bf16(const uint16_t *X, const uint16_t *Wp, const uint16_t *B, uint16_t *Y,
                         int64_t M, int64_t K, int64_t N, int64_t sx, int nthreads) {
    int64_t col = 0;
    product(X, 1, &Wp, B ? &B : 0, &N, &col, N, Y, M, K, sx, nthreads);
}

/* nw (<= 8) packed weights against one X in one parallel region, as linear_bf16.c's: Y [M, sum
 * Ns] contiguous, weight i's outputs in its columns after those of the weights before it, each
 * (m, n) by the instructions of specrag_linear_bf16 (bitwise its result). */
void specrag_linear_bf16_multi(const uint16_t *X, int nw, const uint16_t *const *Wps, const uint16_t *const *Bs,
                               const int64_t *Ns, uint16_t *Y, int64_t M, int64_t K, int64_t sx, int nthreads) {
    int64_t col[8], ldy = 0;
    for (int i = 0; i < nw; i++) {
        col[i] = ldy;
        ldy += Ns[i];
    }
    product(X, nw, Wps, Bs, Ns, col, ldy, Y, M, K, sx, nthreads);
}
