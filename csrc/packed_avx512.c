/*
 * packed_avx512.c: sq_pk_matmul_ref with AVX-512F: one zmm holds the 16 rows of a row block.
 * bits = 4, 8: a word load gives 16 rows' codes, each field is one AND (or shift) and one convert,
 * and the convert feeds one FMA per token of the token block (up to 8 tokens share each unpacked
 * field: prefill); products are field * (x * 2^-offset) = q * x exactly, so the sums equal the
 * reference's.  bits = 2, 3: bit planes, one kmov and one masked add per plane and column, so the
 * work per column scales with the width (W2: 2 adds per 16 rows, where unpacking costs 3 ops).
 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx2,fma")
#include <immintrin.h>

#include "sq_common.h"
#include "sq_packed.h"

#define TB_MAX 8
#define TBP_MAX 2 /* tokens per block of the plane kernels (bits = 2, 3) */
#define SQ_INLINE static inline __attribute__((always_inline))

/* one word of 16 rows: cpw fields of fbits bits; xs points at the word's first column of token 0 */
SQ_INLINE void word_fma512(__m512i v, const int fbits, const int cpw, const float *xs, int64_t xstride,
                           const int tb, __m512 *acc) {
#pragma GCC unroll 32
    for (int c = 0; c < cpw; ++c) {
        const __m512i f = c == cpw - 1 ? _mm512_srli_epi32(v, (unsigned)(fbits * c))
                                       : _mm512_and_si512(v, _mm512_set1_epi32((int)(((1u << fbits) - 1u) << (fbits * c))));
        const __m512 fv = _mm512_cvtepi32_ps(f);
#pragma GCC unroll 8
        for (int t = 0; t < tb; ++t) acc[t] = _mm512_fmadd_ps(fv, _mm512_set1_ps(xs[t * xstride + c]), acc[t]);
    }
}

/* one row block (16 rows) times tb tokens into out[t][16] */
SQ_INLINE void row_block512(const int bits, const int tb, const uint32_t *qrb, const float *smrb, int64_t G,
                            int64_t upg, const float *xs, int64_t xstride, const float *xsum, float *out) {
    __m512 total[TB_MAX], acc[TB_MAX];
    for (int t = 0; t < tb; ++t) total[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        for (int t = 0; t < tb; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t u = g * upg; u < (g + 1) * upg; ++u) {
            const uint32_t *w = qrb + u * bits * SQ_PK_ROWS;
            const int cpw = 32 / bits;
            const float *xu = xs + u * SQ_PK_UNIT;
            for (int j = 0; j < bits; ++j)
                word_fma512(_mm512_loadu_si512(w + j * SQ_PK_ROWS), bits, cpw, xu + j * cpw, xstride, tb, acc);
        }
        const __m512 s = _mm512_loadu_ps(smrb + g * 2 * SQ_PK_ROWS);
        const __m512 m = _mm512_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + SQ_PK_ROWS);
        for (int t = 0; t < tb; ++t) {
            total[t] = _mm512_fmadd_ps(acc[t], s, total[t]);
            total[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[t * G + g]), total[t]);
        }
    }
    for (int t = 0; t < tb; ++t) _mm512_storeu_ps(out + t * SQ_PK_ROWS, total[t]);
}

/* bits = 2, 3: one row block (16 rows) times tb tokens from bit planes.  Per column, a plane's
 * 16-bit row mask goes straight from memory into a mask register and one masked add puts x into
 * that plane's partial sum: `bits` adds per column, SQ_PK_CHAINS chains per plane and token */
SQ_INLINE void row_block_planes512(const int bits, const int tb, const uint32_t *qrb, const float *smrb, int64_t G,
                                   int64_t upg, const float *xs, int64_t xstride, const float *xsum, float *out) {
    __m512 total[TBP_MAX], acc[TBP_MAX][3][SQ_PK_CHAINS];
    for (int t = 0; t < tb; ++t) total[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        for (int t = 0; t < tb; ++t)
            for (int b = 0; b < bits; ++b)
                for (int s = 0; s < SQ_PK_CHAINS; ++s) acc[t][b][s] = _mm512_setzero_ps();
        for (int64_t u = g * upg; u < (g + 1) * upg; ++u) {
            const uint16_t *m = (const uint16_t *)(qrb + u * bits * SQ_PK_ROWS);
            const float *xu = xs + u * SQ_PK_UNIT;
#pragma GCC unroll 32
            for (int c = 0; c < SQ_PK_UNIT; ++c) {
                __mmask16 k[3];
                for (int b = 0; b < bits; ++b) k[b] = _load_mask16((__mmask16 *)(m + b * SQ_PK_UNIT + c));
                for (int t = 0; t < tb; ++t) {
                    const __m512 xb = _mm512_set1_ps(xu[t * xstride + c]);
                    for (int b = 0; b < bits; ++b)
                        acc[t][b][c % SQ_PK_CHAINS] =
                            _mm512_mask_add_ps(acc[t][b][c % SQ_PK_CHAINS], k[b], acc[t][b][c % SQ_PK_CHAINS], xb);
                }
            }
        }
        const __m512 s = _mm512_loadu_ps(smrb + g * 2 * SQ_PK_ROWS);
        const __m512 mn = _mm512_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + SQ_PK_ROWS);
        for (int t = 0; t < tb; ++t) {
            __m512 dot = _mm512_setzero_ps();
            for (int b = 0; b < bits; ++b) {
                const __m512 ps = _mm512_add_ps(_mm512_add_ps(acc[t][b][0], acc[t][b][1]),
                                                _mm512_add_ps(acc[t][b][2], acc[t][b][3]));
                dot = _mm512_fmadd_ps(_mm512_set1_ps(sq_pk_pow2(b)), ps, dot);
            }
            total[t] = _mm512_fmadd_ps(dot, s, total[t]);
            total[t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[t * G + g]), total[t]);
        }
    }
    for (int t = 0; t < tb; ++t) _mm512_storeu_ps(out + t * SQ_PK_ROWS, total[t]);
}

typedef void (*row_block_fn)(const uint32_t *, const float *, int64_t, int64_t, const float *, int64_t, const float *,
                             float *);

#define DEF_RB(B, TB)                                                                                              \
    static void rb512_##B##_##TB(const uint32_t *q, const float *sm, int64_t G, int64_t upg, const float *xs,        \
                                 int64_t xstride, const float *xsum, float *out) {                                  \
        row_block512(B, TB, q, sm, G, upg, xs, xstride, xsum, out);                                                 \
    }
#define DEF_BITS(B) DEF_RB(B, 1) DEF_RB(B, 2) DEF_RB(B, 3) DEF_RB(B, 4) DEF_RB(B, 5) DEF_RB(B, 6) DEF_RB(B, 7) DEF_RB(B, 8)
DEF_BITS(4)
DEF_BITS(8)
#define DEF_RBP(B, TB)                                                                                             \
    static void rb512_##B##_##TB(const uint32_t *q, const float *sm, int64_t G, int64_t upg, const float *xs,        \
                                 int64_t xstride, const float *xsum, float *out) {                                  \
        row_block_planes512(B, TB, q, sm, G, upg, xs, xstride, xsum, out);                                          \
    }
DEF_RBP(2, 1)
DEF_RBP(2, 2)
DEF_RBP(3, 1)
DEF_RBP(3, 2)
#define ROW_FNS(B) {rb512_##B##_1, rb512_##B##_2, rb512_##B##_3, rb512_##B##_4, rb512_##B##_5, rb512_##B##_6, rb512_##B##_7, rb512_##B##_8}
static const row_block_fn fns[4][TB_MAX] = {{rb512_2_1, rb512_2_2}, {rb512_3_1, rb512_3_2}, ROW_FNS(4), ROW_FNS(8)};

static void store_rows(void *y, sq_dtype dt, int64_t base, int64_t n, const float *v) {
    if (dt == SQ_F32) {
        memcpy((float *)y + base, v, (size_t)n * sizeof(float));
    } else {
        for (int64_t i = 0; i < n; ++i) ((uint16_t *)y)[base + i] = sq_f32_to_bf16(v[i]);
    }
}

int sq_pk_matmul_avx512(const sq_pk_params *p, const uint32_t *qweight, const float *scale_min, const void *x,
                        void *y) {
    int st = sq_pk_check(p);
    if (st) return st;
    const int64_t T = p->tokens, N = p->rows, K = p->cols, G = K / p->group, upg = p->group / SQ_PK_UNIT;
    const int64_t NU = K / SQ_PK_UNIT, NB = sq_pk_row_blocks(N), XL = sq_pk_xs_len(p);
    if (T == 0 || N == 0) return SQ_OK;
    float *xs = sq_alloc((size_t)(T * XL) * sizeof(float));
    float *xsum = sq_alloc((size_t)(T * G) * sizeof(float));
    if (!xs || !xsum) {
        free(xs);
        free(xsum);
        return SQ_ERR_NOMEM;
    }
    const row_block_fn *fn = fns[p->bits == 2 ? 0 : p->bits == 3 ? 1 : p->bits == 4 ? 2 : 3];
    const int tbmax = sq_pk_planar(p->bits) ? TBP_MAX : TB_MAX;
    const int nt = sq_threads(p->nthreads, NB > T ? NB : T);
    /* a few tokens (decode) are prepared serially: a barrier costs more than K elements; the row
     * blocks go in small dynamic chunks so a thread the OS preempts does not hold up the others */
    const int serial_prep = T * K < (1 << 16);
    if (serial_prep)
        for (int64_t t = 0; t < T; ++t) sq_pk_prepare_token(p, x, t, xs + t * XL, xsum + t * G);
#pragma omp parallel num_threads(nt)
    {
        if (!serial_prep) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; ++t) sq_pk_prepare_token(p, x, t, xs + t * XL, xsum + t * G);
        }
        float out[TB_MAX * SQ_PK_ROWS];
#pragma omp for schedule(dynamic, 4)
        for (int64_t rb = 0; rb < NB; ++rb) {
            const int64_t r0 = rb * SQ_PK_ROWS, nr = N - r0 < SQ_PK_ROWS ? N - r0 : SQ_PK_ROWS;
            for (int64_t t0 = 0; t0 < T; t0 += tbmax) {
                const int tb = (int)(T - t0 < tbmax ? T - t0 : tbmax);
                fn[tb - 1](qweight + rb * NU * p->bits * SQ_PK_ROWS, scale_min + rb * G * 2 * SQ_PK_ROWS, G, upg,
                           xs + t0 * XL, XL, xsum + t0 * G, out);
                for (int t = 0; t < tb; ++t) store_rows(y, p->y_dtype, (t0 + t) * N + r0, nr, out + t * SQ_PK_ROWS);
            }
        }
    }
    free(xs);
    free(xsum);
    return SQ_OK;
}

#endif /* x86 */
