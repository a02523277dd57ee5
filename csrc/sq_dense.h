/*
 * sq_dense.h: y = x W^T for a dense bfloat16 weight W (rows, cols), row-major: the unquantized
 * layers of a packed model (the output head, tied to the embedding, stays bf16 in SmolLM2 and most
 * small models) on CPUs without native bf16 arithmetic, where torch's bf16 matmul runs below the
 * memory bandwidth.  x float32 or bfloat16 (tokens, cols), y float32 or bfloat16 (tokens, rows).
 *
 * Summation order, shared by every ISA so that they agree bit for bit on finite inputs; per row and
 * token: SQ_DN_LANES = 16 fp32 partial sums, lane l adds fma(w[k], x[k], .) for the columns
 * k = l, l + 16, l + 32, ... in order (the last, partial round of columns too, on the same lanes);
 * then the lanes are summed as a tree: s[l] = a[l] + a[l + 8] (l < 8), s[l] + s[l + 4] (l < 4),
 * then + [l + 2] (l < 2), then [0] + [1].  One zmm (or two ymm) holds the 16 lanes.
 */
#ifndef SQ_DENSE_H
#define SQ_DENSE_H

#include <stdint.h>

#include "sq_common.h"
#include "sq_kernels.h"

#define SQ_DN_LANES 16

typedef struct {
    int64_t tokens; /* rows of x and y */
    int64_t rows;   /* output features */
    int64_t cols;   /* input features */
    int nthreads;
    sq_dtype x_dtype;
    sq_dtype y_dtype;
} sq_dn_params;

typedef int (*sq_dn_matmul_fn)(const sq_dn_params *, const uint16_t *w, const void *x, void *y);

int sq_dn_matmul_ref(const sq_dn_params *, const uint16_t *w, const void *x, void *y);
int sq_dn_matmul_avx2(const sq_dn_params *, const uint16_t *w, const void *x, void *y);
int sq_dn_matmul_avx512(const sq_dn_params *, const uint16_t *w, const void *x, void *y);

/* dispatch.c: "ref", "avx2", "avx512" or "auto"; NULL when unsupported */
sq_dn_matmul_fn sq_dn_kernel(const char *isa, const char **name_out);

/* one thread per SQ_DN_WORK_PER_THREAD weights x tokens (~8 us of reading at ~20 GB/s) */
#define SQ_DN_WORK_PER_THREAD (1 << 16)

static inline int sq_dn_threads(const sq_dn_params *p) {
    const int64_t work = p->rows * p->cols * (p->tokens > 0 ? p->tokens : 1);
    const int64_t cap = work / SQ_DN_WORK_PER_THREAD > 1 ? work / SQ_DN_WORK_PER_THREAD : 1;
    return sq_threads(p->nthreads, cap < p->rows ? cap : p->rows);
}

static inline int sq_dn_check(const sq_dn_params *p) {
    return p->tokens < 0 || p->rows < 0 || p->cols <= 0 ? SQ_ERR_ARGS : SQ_OK;
}

/* x as fp32, tokens x cols: x itself when it is fp32 (*owned = NULL), else a converted copy */
static inline int sq_dn_x_f32(const sq_dn_params *p, const void *x, const float **xf, float **owned) {
    *owned = NULL;
    if (p->x_dtype == SQ_F32) {
        *xf = (const float *)x;
        return SQ_OK;
    }
    const int64_t n = p->tokens * p->cols;
    float *buf = (float *)sq_alloc((size_t)n * sizeof(float));
    if (!buf) return SQ_ERR_NOMEM;
    for (int64_t i = 0; i < n; ++i) buf[i] = sq_bf16_to_f32(((const uint16_t *)x)[i]);
    *xf = buf;
    *owned = buf;
    return SQ_OK;
}

/* nr (1..SQ_DN_RB) rows from wr (row stride K) against one token's x: out[i] = row i . x, in the
 * order above; pf: the kernel may prefetch the rows SQ_DN_PF_STEPS steps ahead (they exist) */
#define SQ_DN_RB 4
#define SQ_DN_PF_STEPS 2 /* software prefetch distance, in steps of SQ_DN_RB rows (dense_avx512.c) */
typedef void (*sq_dn_rows_fn)(const uint16_t *wr, int64_t K, int nr, const float *xt, float *out, int pf);

/* the lane tree of the header comment */
static inline float sq_dn_reduce(const float *a) {
    float s8[8], s4[4];
    for (int l = 0; l < 8; ++l) s8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* Shared by every ISA: checks, x as fp32, then steps of SQ_DN_RB rows over the threads, each
 * token in turn, through the ISA's rows function. */
static inline int sq_dn_run(const sq_dn_params *p, const uint16_t *w, const void *x, void *y, sq_dn_rows_fn rows) {
    int st = sq_dn_check(p);
    if (st) return st;
    const int64_t T = p->tokens, N = p->rows, K = p->cols;
    if (T == 0 || N == 0) return SQ_OK;
    const float *xf;
    float *owned;
    if ((st = sq_dn_x_f32(p, x, &xf, &owned))) return st;
    const int nt = sq_dn_threads(p);
    const int64_t steps = (N + SQ_DN_RB - 1) / SQ_DN_RB;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t s = 0; s < steps; ++s) {
        const int64_t r0 = s * SQ_DN_RB;
        const int nr = N - r0 < SQ_DN_RB ? (int)(N - r0) : SQ_DN_RB;
        for (int64_t t = 0; t < T; ++t) {
            float out[SQ_DN_RB];
            rows(w + r0 * K, K, nr, xf + t * K, out, t == 0 && r0 + (SQ_DN_PF_STEPS + 1) * SQ_DN_RB <= N);
            for (int i = 0; i < nr; ++i) sq_store(y, p->y_dtype, t * N + r0 + i, out[i]);
        }
    }
    free(owned);
    return SQ_OK;
}

#endif /* SQ_DENSE_H */
