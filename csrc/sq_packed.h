/*
 * sq_packed.h: the packed low-bit weight layout and the C API of the packed matmul kernels.
 *
 *   y[t, r] = sum_g ( scale[r,g] * sum_{k in g} q[r,k] x[t,k]  +  min[r,g] * sum_{k in g} x[t,k] )
 *
 * with min = -scale * zero, i.e. y = x W^T for W = (q - zero) * scale (asymmetric codes
 * q in [0, 2^bits - 1]; symmetric codes are stored shifted by 2^(bits-1), zero = 2^(bits-1)).
 * The per-group sums of x are computed once per call, so the inner loop is codes times x only.
 *
 * Layout (written down here once; sliderquant/packed.py writes it, the kernels read it):
 *   - rows (output features) come in blocks of SQ_PK_ROWS = 16; the last block is padded with
 *     rows whose codes, scales and mins are all 0 (they compute 0 and are never stored);
 *   - columns (input features) come in units of SQ_PK_UNIT = 32; K must be a multiple of 32 and the
 *     group size a multiple of 32 that divides K (per-channel: group = K), so no unit straddles a group;
 *   - qweight is uint32 [n_row_blocks][K / 32][bits][16]: one unit of one row block is `bits` words
 *     per row, and the 16 rows' words of one word index are adjacent (one zmm / two ymm loads);
 *   - inside a unit, for bits = 2, 4, 8: word j holds columns j*cpw .. j*cpw + cpw - 1 (cpw = 32/bits),
 *     column j*cpw + c in bits [bits*c, bits*c + bits) (little end first); for bits = 2 a nibble
 *     of a word is a column pair, q[2i] + 4 q[2i+1], the index of a 16-entry table (decode);
 *   - bits = 3 is bit planes: the unit's words, read as uint16 [3][32] (little-endian halves:
 *     element 2i is the low half of word i), hold in element [b][c] bit b of the codes of the
 *     block's 16 rows at column c, row i in bit i (an AVX-512 mask register per plane and column);
 *   - scale_min is float32 [n_row_blocks][n_groups][2][16]: the 16 rows' scales, then their mins.
 *
 * Summation order, shared by every ISA so that they agree bit for bit on finite inputs; per row
 * and token, per group:
 *   - bits = 2, 4, 8 in a call of one token (decode): SQ_PK_WCHAINS = 4 fp32 partial sums; the
 *     group's words, counted in storage order from its first word, go to partial sum (word % 4);
 *     inside a word, bits = 4, 8: one fused multiply-add per code, fields in order;
 *     bits = 2: per column pair, fields in order, p = fma(q1, x1, q0 * x0) and acc = acc + p (the
 *     AVX-512 kernel looks p up in a per-call table of the 16 pairs of codes: one permute per pair
 *     of columns and 16 rows); the group's sum is (acc0 + acc1) + (acc2 + acc3).  Four chains
 *     hide the latency of the adds: with one, a decode ran at the FMA latency, not the bandwidth;
 *   - bits = 2, 4, 8 in a call of more tokens (prefill): one fp32 accumulator runs over the
 *     group's units, words and fields in storage order with one fused multiply-add per code (the
 *     token block's FMAs are the independent chains there);
 *     the SIMD kernels multiply the masked field (q * 2^offset, exact) by x * 2^-offset (exact
 *     unless |x| < ~2^-96 underflows), so their products equal the reference's q * x;
 *   - bits = 3 (planes): SQ_PK_CHAINS = 2 fp32 partial sums per plane b, acc[b][k % 2], each
 *     adds x[k] for the columns k of the group, in order, whose code has bit b set (k % 2 counts
 *     from the group's first column; planes in order inside a column); then per plane
 *     ps_b = acc[b][0] + acc[b][1] and acc = fma(2^b, ps_b, acc) for
 *     b = 0, 1, ... from acc = 0: no multiply per code, 3 adds per column and 16 rows.  This
 *     is the order of a call with one token (decode); a call with more tokens (prefill) rebuilds
 *     each code from its planes and sums one fused multiply-add per code in column order, as for
 *     bits = 2, 4, 8, so the unpacking is shared by the tokens of a block;
 * then total = fma(acc, scale, total) and total = fma(min, xsum_g, total), groups in order.
 * NaN and Inf in x propagate as in a float matmul (not checked; the plane kernels of AVX2 multiply
 * x by 0 for a clear bit, so there an Inf x may give NaN where the others skip it).
 */
#ifndef SQ_PACKED_H
#define SQ_PACKED_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "sq_common.h"
#include "sq_kernels.h"

#define SQ_PK_ROWS 16
#define SQ_PK_UNIT 32
#define SQ_PK_CHAINS 2 /* partial sums per plane (bits = 3) */

#define SQ_PK_WCHAINS 4 /* partial sums per group in decode (bits = 2, 4, 8) */

static inline int sq_pk_planar(int bits) { return bits == 3; }

_Static_assert(SQ_PK_ROWS * sizeof(uint32_t) == 64, "a row block's word is one 64-byte zmm / cache line");
_Static_assert(SQ_PK_UNIT == 8 * sizeof(uint32_t), "a unit is 32 columns: bits words of 32 bits per row");
_Static_assert(sizeof(float) == 4 && sizeof(uint32_t) == 4, "scale_min and qweight are 4-byte elements");

typedef struct {
    int64_t tokens; /* rows of x and y */
    int64_t rows;   /* output features N */
    int64_t cols;   /* input features K, a multiple of SQ_PK_UNIT */
    int64_t group;  /* columns per group: a multiple of SQ_PK_UNIT dividing K */
    int bits;       /* 2, 3, 4 or 8 */
    int nthreads;
    sq_dtype x_dtype;
    sq_dtype y_dtype;
} sq_pk_params;

typedef int (*sq_pk_matmul_fn)(const sq_pk_params *, const uint32_t *qweight, const float *scale_min,
                               const void *x, void *y);

int sq_pk_matmul_ref(const sq_pk_params *, const uint32_t *qweight, const float *scale_min, const void *x, void *y);
int sq_pk_matmul_avx2(const sq_pk_params *, const uint32_t *qweight, const float *scale_min, const void *x, void *y);
int sq_pk_matmul_avx512(const sq_pk_params *, const uint32_t *qweight, const float *scale_min, const void *x,
                        void *y);

/* dispatch.c: "ref", "avx2", "avx512" or "auto" (the best this CPU runs); NULL when unsupported */
sq_pk_matmul_fn sq_pk_kernel(const char *isa, const char **name_out);

/* ---------------------------------------------------------------- shared by all ISAs */

static inline int64_t sq_pk_row_blocks(int64_t rows) { return (rows + SQ_PK_ROWS - 1) / SQ_PK_ROWS; }

/* words per row in one unit, and the qweight / scale_min element counts */
static inline int64_t sq_pk_qweight_words(int64_t rows, int64_t cols, int bits) {
    return sq_pk_row_blocks(rows) * (cols / SQ_PK_UNIT) * bits * SQ_PK_ROWS;
}
static inline int64_t sq_pk_scale_min_floats(int64_t rows, int64_t cols, int64_t group) {
    return sq_pk_row_blocks(rows) * (cols / group) * 2 * SQ_PK_ROWS;
}

static inline int sq_pk_check(const sq_pk_params *p) {
    if (p->tokens < 0 || p->rows < 0 || p->cols <= 0 || p->cols % SQ_PK_UNIT) return SQ_ERR_ARGS;
    if (p->group <= 0 || p->group % SQ_PK_UNIT || p->cols % p->group) return SQ_ERR_ARGS;
    if (p->bits != 2 && p->bits != 3 && p->bits != 4 && p->bits != 8) return SQ_ERR_ARGS;
    return SQ_OK;
}

/* threads for one call: at most one per SQ_PK_WORK_PER_THREAD column-blocks x tokens (16 rows x 1
 * column x 1 token each, about a nanosecond).  A decode step's linears follow each other within
 * microseconds, so the second thread is usually still spinning (sliderquant sets GOMP_SPINCOUNT):
 * 8K lets SmolLM2's 576 x 576 (21K) use two threads; a decode step took 29.8 ms with the former
 * 64K (one thread for every SmolLM2 linear) and 26.1 ms with 8K or 2K (2 threads, quiet machine) */
#define SQ_PK_WORK_PER_THREAD (1 << 13)
static inline int64_t sq_pk_thread_items(const sq_pk_params *p, int64_t items) {
    const int64_t work = sq_pk_row_blocks(p->rows) * p->cols * (p->tokens > 0 ? p->tokens : 1);
    const int64_t cap = work / SQ_PK_WORK_PER_THREAD > 1 ? work / SQ_PK_WORK_PER_THREAD : 1;
    return items < cap ? items : cap; /* for sq_threads(nthreads, .) */
}

/* floats of (scaled) x per token: one per column */
static inline int64_t sq_pk_xs_len(const sq_pk_params *p) { return p->cols; }

static inline float sq_pk_x(const void *x, sq_dtype dt, int64_t idx) {
    if (dt == SQ_F32) return ((const float *)x)[idx];
    uint32_t u = (uint32_t)((const uint16_t *)x)[idx] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* 2^e as a float, for -126 <= e <= 127 */
static inline float sq_pk_pow2(int e) {
    uint32_t u = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/*
 * Per token: xsum[g] (sequential fp32 sums over each group) and, when xs is not NULL, x as fp32,
 * for bits = 2, 4, 8 scaled for the SIMD field extraction: a field at bit offset o extracted by
 * masking is q * 2^o, so its x is multiplied by 2^-o; the top field of a word is extracted by a
 * shift and keeps x.  The plane kernels (bits = 3) read x as it is.
 */
static inline void sq_pk_prepare_token(const sq_pk_params *p, const void *x, int64_t t, float *xs, float *xsum) {
    const int64_t K = p->cols, G = K / p->group;
    const int64_t base = t * K;
    for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int64_t k = g * p->group; k < (g + 1) * p->group; ++k) s += sq_pk_x(x, p->x_dtype, base + k);
        xsum[g] = s;
    }
    if (!xs) return;
    const int cpw = 32 / p->bits;
    for (int64_t k = 0; k < K; ++k) {
        const float v = sq_pk_x(x, p->x_dtype, base + k);
        const int c = (int)(k % cpw);
        xs[k] = sq_pk_planar(p->bits) || c == cpw - 1 ? v : v * sq_pk_pow2(-p->bits * c);
    }
}

/* bits = 2, decode: the 16 products of one column pair, tab[q0 + 4 q1] = fma(q1, x1, q0 * x0)
 * (the order sq_packed.h states; the reference computes each p the same way) */
static inline void sq_pk_pair_table(float x0, float x1, float *tab) {
    for (int i = 0; i < 16; ++i) tab[i] = fmaf((float)(i >> 2), x1, (float)(i & 3) * x0);
}

/* Shared by every kernel. */

/* The per-call scratch: x as the kernel reads it (xlen floats per token) and its per-group sums. */
static inline int sq_pk_scratch(const sq_pk_params *p, int64_t xlen, float **xs, float **xsum) {
    *xs = (float *)sq_alloc((size_t)(p->tokens * xlen) * sizeof(float));
    *xsum = (float *)sq_alloc((size_t)(p->tokens * (p->cols / p->group)) * sizeof(float));
    if (*xs && *xsum) return SQ_OK;
    free(*xs);
    free(*xsum);
    return SQ_ERR_NOMEM;
}

/* n fp32 sums to y[base .. base + n) in y's dtype. */
static inline void sq_pk_store_rows(void *y, sq_dtype dt, int64_t base, int64_t n, const float *v) {
    if (dt == SQ_F32) {
        memcpy((float *)y + base, v, (size_t)n * sizeof(float));
    } else {
        for (int64_t i = 0; i < n; ++i) ((uint16_t *)y)[base + i] = sq_f32_to_bf16(v[i]);
    }
}

#endif /* SQ_PACKED_H */
