/*
 * packed_avx2.c: sq_pk_matmul_ref with AVX2/FMA.  A row block is two halves of 8 rows (one ymm
 * each).  bits = 2, 4, 8: each field is one AND (or shift) and one convert feeding one FMA per token
 * of the token block (up to 4 tokens share each unpacked field); decode (one token) runs the four
 * chains per group of sq_packed.h, for bits = 2 a multiply and an FMA per column pair and one add.
 * bits = 3 (bit planes): one table load and one FMA per plane, column and 8 rows for one token; for
 * more, each code is rebuilt from the table rows and shared by up to 4 tokens' FMAs.  Same sums and
 * order as the reference.
 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "sq_common.h"
#include "sq_packed.h"

#define TB_MAX 4
#define HALF 8
#define SQ_INLINE static inline __attribute__((always_inline))

SQ_INLINE void word_fma256(__m256i v, const int fbits, const int cpw, const float *xs, int64_t xstride, const int tb,
                           __m256 *acc) {
#pragma GCC unroll 32
    for (int c = 0; c < cpw; ++c) {
        const __m256i f = c == cpw - 1 ? _mm256_srli_epi32(v, fbits * c)
                                       : _mm256_and_si256(v, _mm256_set1_epi32((int)(((1u << fbits) - 1u) << (fbits * c))));
        const __m256 fv = _mm256_cvtepi32_ps(f);
#pragma GCC unroll 4
        for (int t = 0; t < tb; ++t) acc[t] = _mm256_fmadd_ps(fv, _mm256_broadcast_ss(xs + t * xstride + c), acc[t]);
    }
}

#define LOADW(p) _mm256_loadu_si256((const __m256i *)(p))

SQ_INLINE __m256 field256(__m256i v, const int fbits, const int cpw, const int c) {
    return _mm256_cvtepi32_ps(c == cpw - 1 ? _mm256_srli_epi32(v, fbits * c)
                                           : _mm256_and_si256(v, _mm256_set1_epi32((int)(((1u << fbits) - 1u) << (fbits * c)))));
}

/* decode, one word of 8 rows into one chain (xw: the word's scaled x); bits = 2 per column pair
 * p = fma(f1, x1, f0 * x0) then a + p, as the reference */
SQ_INLINE __m256 word_decode256(const int bits, const uint32_t *wp, const float *xw, __m256 a) {
    const __m256i v = LOADW(wp);
    if (bits == 2) {
#pragma GCC unroll 8
        for (int c = 0; c < 16; c += 2) {
            const __m256 p = _mm256_fmadd_ps(field256(v, 2, 16, c + 1), _mm256_broadcast_ss(xw + c + 1),
                                             _mm256_mul_ps(field256(v, 2, 16, c), _mm256_broadcast_ss(xw + c)));
            a = _mm256_add_ps(a, p);
        }
        return a;
    }
    word_fma256(v, bits, 32 / bits, xw, 0, 1, &a);
    return a;
}

/* bits = 2, 4, 8, one token: 8 rows (q, sm offset to the half), SQ_PK_WCHAINS chains per group */
SQ_INLINE void half_decode256(const int bits, const uint32_t *qrb, const float *smrb, int64_t G, int64_t upg,
                              int64_t group, const float *xs, const float *xsum, float *out) {
    const int64_t wpg = upg * bits;
    const int cpw = 32 / bits;
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        const uint32_t *w = qrb + g * wpg * SQ_PK_ROWS;
        const float *xg = xs + g * group;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define WD(i, a) a = word_decode256(bits, w + (i) * SQ_PK_ROWS, xg + (i) * cpw, a)
        int64_t i = 0;
        for (; i + 4 <= wpg; i += 4) {
            WD(i, a0);
            WD(i + 1, a1);
            WD(i + 2, a2);
            WD(i + 3, a3);
        }
        if (i < wpg) WD(i, a0);
        if (i + 1 < wpg) WD(i + 1, a1);
        if (i + 2 < wpg) WD(i + 2, a2);
#undef WD
        const __m256 dot = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        total = _mm256_fmadd_ps(dot, _mm256_loadu_ps(smrb + g * 2 * SQ_PK_ROWS), total);
        total = _mm256_fmadd_ps(_mm256_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + SQ_PK_ROWS), _mm256_broadcast_ss(xsum + g),
                                total);
    }
    _mm256_storeu_ps(out, total);
}

typedef void (*decode_fn)(const uint32_t *, const float *, int64_t, int64_t, int64_t, const float *, const float *,
                          float *);
#define DEF_DEC(B)                                                                                                 \
    static void dec256_##B(const uint32_t *q, const float *sm, int64_t G, int64_t upg, int64_t group,               \
                           const float *xs, const float *xsum, float *out) {                                        \
        half_decode256(B, q, sm, G, upg, group, xs, xsum, out);                                                    \
    }
DEF_DEC(2)
DEF_DEC(4)
DEF_DEC(8)

/* 8 rows (half h of a row block) times tb tokens into out[t][16] + 8h */
SQ_INLINE void half_block256(const int bits, const int tb, const uint32_t *qrb, const float *smrb, int64_t G,
                             int64_t upg, const float *xs, int64_t xstride, const float *xsum, float *out) {
    __m256 total[TB_MAX], acc[TB_MAX];
    for (int t = 0; t < tb; ++t) total[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        for (int t = 0; t < tb; ++t) acc[t] = _mm256_setzero_ps();
        for (int64_t u = g * upg; u < (g + 1) * upg; ++u) {
            const uint32_t *w = qrb + u * bits * SQ_PK_ROWS;
            const int cpw = 32 / bits;
            const float *xu = xs + u * SQ_PK_UNIT;
            for (int j = 0; j < bits; ++j)
                word_fma256(LOADW(w + j * SQ_PK_ROWS), bits, cpw, xu + j * cpw, xstride, tb, acc);
        }
        const __m256 s = _mm256_loadu_ps(smrb + g * 2 * SQ_PK_ROWS);
        const __m256 m = _mm256_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + SQ_PK_ROWS);
        for (int t = 0; t < tb; ++t) {
            total[t] = _mm256_fmadd_ps(acc[t], s, total[t]);
            total[t] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(xsum + t * G + g), total[t]);
        }
    }
    for (int t = 0; t < tb; ++t) _mm256_storeu_ps(out + t * SQ_PK_ROWS, total[t]);
}

/* bits = 3: rows 8h .. 8h + 7 of a row block, one token, from bit planes.  A plane's mask byte
 * for the 8 rows indexes lut (256 x 8 floats 0 / 1), and fma(bit, x, acc) adds x or +-0 exactly as
 * the reference's conditional add (a partial sum is never -0) */
SQ_INLINE void half_planes256(const int bits, const int h, const uint32_t *qrb, const float *smrb, int64_t G,
                              int64_t upg, const float *xs, const float *xsum, const float (*lut)[HALF],
                              float *out) {
    __m256 total = _mm256_setzero_ps(), acc[3][SQ_PK_CHAINS];
    for (int64_t g = 0; g < G; ++g) {
        for (int b = 0; b < bits; ++b)
            for (int s = 0; s < SQ_PK_CHAINS; ++s) acc[b][s] = _mm256_setzero_ps();
        for (int64_t u = g * upg; u < (g + 1) * upg; ++u) {
            const uint8_t *m = (const uint8_t *)(qrb + u * bits * SQ_PK_ROWS) + h; /* little-endian halves */
            const float *xu = xs + u * SQ_PK_UNIT;
#pragma GCC unroll 32
            for (int c = 0; c < SQ_PK_UNIT; ++c) {
                const __m256 xb = _mm256_broadcast_ss(xu + c);
                for (int b = 0; b < bits; ++b)
                    acc[b][c % SQ_PK_CHAINS] = _mm256_fmadd_ps(_mm256_loadu_ps(lut[m[2 * (b * SQ_PK_UNIT + c)]]), xb,
                                                               acc[b][c % SQ_PK_CHAINS]);
            }
        }
        __m256 dot = _mm256_setzero_ps();
        for (int b = 0; b < bits; ++b) {
            const __m256 ps = _mm256_add_ps(acc[b][0], acc[b][1]);
            dot = _mm256_fmadd_ps(_mm256_set1_ps(sq_pk_pow2(b)), ps, dot);
        }
        total = _mm256_fmadd_ps(dot, _mm256_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + h * HALF), total);
        total = _mm256_fmadd_ps(_mm256_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + SQ_PK_ROWS + h * HALF),
                                _mm256_broadcast_ss(xsum + g), total);
    }
    _mm256_storeu_ps(out + h * HALF, total);
}

/* bits = 3 with more than one token: rows 8h .. 8h + 7, tb tokens; each code is rebuilt from
 * the planes' table rows (lut0 + 2 lut1 + 4 lut2, exact) and feeds one FMA per token */
SQ_INLINE void half_codes256(const int bits, const int tb, const int h, const uint32_t *qrb, const float *smrb,
                             int64_t G, int64_t upg, const float *xs, int64_t xstride, const float *xsum,
                             const float (*lut)[HALF], float *out) {
    __m256 total[TB_MAX], acc[TB_MAX];
    for (int t = 0; t < tb; ++t) total[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        for (int t = 0; t < tb; ++t) acc[t] = _mm256_setzero_ps();
        for (int64_t u = g * upg; u < (g + 1) * upg; ++u) {
            const uint8_t *m = (const uint8_t *)(qrb + u * bits * SQ_PK_ROWS) + h;
            const float *xu = xs + u * SQ_PK_UNIT;
#pragma GCC unroll 8
            for (int c = 0; c < SQ_PK_UNIT; ++c) {
                __m256 fv = _mm256_fmadd_ps(_mm256_set1_ps(2.0f), _mm256_loadu_ps(lut[m[2 * (SQ_PK_UNIT + c)]]),
                                            _mm256_loadu_ps(lut[m[2 * c]]));
                if (bits == 3)
                    fv = _mm256_fmadd_ps(_mm256_set1_ps(4.0f), _mm256_loadu_ps(lut[m[2 * (2 * SQ_PK_UNIT + c)]]), fv);
                for (int t = 0; t < tb; ++t)
                    acc[t] = _mm256_fmadd_ps(fv, _mm256_broadcast_ss(xu + t * xstride + c), acc[t]);
            }
        }
        const __m256 s = _mm256_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + h * HALF);
        const __m256 mn = _mm256_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + SQ_PK_ROWS + h * HALF);
        for (int t = 0; t < tb; ++t) {
            total[t] = _mm256_fmadd_ps(acc[t], s, total[t]);
            total[t] = _mm256_fmadd_ps(mn, _mm256_broadcast_ss(xsum + t * G + g), total[t]);
        }
    }
    for (int t = 0; t < tb; ++t) _mm256_storeu_ps(out + t * SQ_PK_ROWS + h * HALF, total[t]);
}

typedef void (*codes_fn)(int, const uint32_t *, const float *, int64_t, int64_t, const float *, int64_t,
                         const float *, const float (*)[HALF], float *);
#define DEF_HC(B, TB)                                                                                              \
    static void hc256_##B##_##TB(int h, const uint32_t *q, const float *sm, int64_t G, int64_t upg, const float *xs,\
                                 int64_t xstride, const float *xsum, const float (*lut)[HALF], float *out) {        \
        half_codes256(B, TB, h, q, sm, G, upg, xs, xstride, xsum, lut, out);                                        \
    }
DEF_HC(3, 1) DEF_HC(3, 2) DEF_HC(3, 3) DEF_HC(3, 4)
static const codes_fn codes_fns[TB_MAX] = {hc256_3_1, hc256_3_2, hc256_3_3, hc256_3_4};
static void hbp256_3(int h, const uint32_t *q, const float *sm, int64_t G, int64_t upg, const float *xs,
                     const float *xsum, const float (*lut)[HALF], float *out) {
    half_planes256(3, h, q, sm, G, upg, xs, xsum, lut, out);
}

typedef void (*half_fn)(const uint32_t *, const float *, int64_t, int64_t, const float *, int64_t, const float *,
                        float *);

#define DEF_HB(B, TB)                                                                                              \
    static void hb256_##B##_##TB(const uint32_t *q, const float *sm, int64_t G, int64_t upg, const float *xs,        \
                                 int64_t xstride, const float *xsum, float *out) {                                  \
        half_block256(B, TB, q, sm, G, upg, xs, xstride, xsum, out);                                                \
    }
#define DEF_BITS(B) DEF_HB(B, 1) DEF_HB(B, 2) DEF_HB(B, 3) DEF_HB(B, 4)
DEF_BITS(2)
DEF_BITS(4)
DEF_BITS(8)
#define HALF_FNS(B) {hb256_##B##_1, hb256_##B##_2, hb256_##B##_3, hb256_##B##_4}
static const half_fn fns[3][TB_MAX] = {HALF_FNS(2), HALF_FNS(4), HALF_FNS(8)};

int sq_pk_matmul_avx2(const sq_pk_params *p, const uint32_t *qweight, const float *scale_min, const void *x,
                      void *y) {
    int st = sq_pk_check(p);
    if (st) return st;
    const int64_t T = p->tokens, N = p->rows, K = p->cols, G = K / p->group, upg = p->group / SQ_PK_UNIT;
    const int64_t NU = K / SQ_PK_UNIT, NB = sq_pk_row_blocks(N), XL = sq_pk_xs_len(p);
    if (T == 0 || N == 0) return SQ_OK;
    float *xs, *xsum;
    if ((st = sq_pk_scratch(p, XL, &xs, &xsum))) return st;
    const int planar = sq_pk_planar(p->bits);
    const half_fn *fn = fns[p->bits == 2 ? 0 : p->bits == 4 ? 1 : 2];
    const decode_fn dfn = p->bits == 2 ? dec256_2 : p->bits == 4 ? dec256_4 : dec256_8;
    float lut[256][HALF]; /* bits of a mask byte as floats, for the plane kernels */
    for (int i = 0; i < 256; ++i)
        for (int r = 0; r < HALF; ++r) lut[i][r] = (float)((i >> r) & 1);
    const int nt = sq_threads(p->nthreads, sq_pk_thread_items(p, NB > T ? NB : T));
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
            const uint32_t *q = qweight + rb * NU * p->bits * SQ_PK_ROWS;
            const float *sm = scale_min + rb * G * 2 * SQ_PK_ROWS;
            if (planar && T > 1) {
                for (int64_t t0 = 0; t0 < T; t0 += TB_MAX) {
                    const int tb = (int)(T - t0 < TB_MAX ? T - t0 : TB_MAX);
                    for (int h = 0; h < (nr > HALF ? 2 : 1); ++h)
                        codes_fns[tb - 1](h, q, sm, G, upg, xs + t0 * XL, XL, xsum + t0 * G,
                                                       (const float(*)[HALF])lut, out);
                    for (int t = 0; t < tb; ++t) sq_pk_store_rows(y, p->y_dtype, (t0 + t) * N + r0, nr, out + t * SQ_PK_ROWS);
                }
                continue;
            }
            if (planar) {
                for (int64_t t = 0; t < T; ++t) {
                    for (int h = 0; h < (nr > HALF ? 2 : 1); ++h)
                        hbp256_3(h, q, sm, G, upg, xs + t * XL, xsum + t * G,
                                                             (const float(*)[HALF])lut, out);
                    sq_pk_store_rows(y, p->y_dtype, t * N + r0, nr, out);
                }
                continue;
            }
            if (T == 1) { /* decode: four chains per group */
                for (int h = 0; h < (nr > HALF ? 2 : 1); ++h)
                    dfn(q + h * HALF, sm + h * HALF, G, upg, p->group, xs, xsum, out + h * HALF);
                sq_pk_store_rows(y, p->y_dtype, r0, nr, out);
                continue;
            }
            for (int64_t t0 = 0; t0 < T; t0 += TB_MAX) {
                const int tb = (int)(T - t0 < TB_MAX ? T - t0 : TB_MAX);
                for (int h = 0; h < (nr > HALF ? 2 : 1); ++h)
                    fn[tb - 1](q + h * HALF, sm + h * HALF, G, upg, xs + t0 * XL, XL, xsum + t0 * G, out + h * HALF);
                for (int t = 0; t < tb; ++t) sq_pk_store_rows(y, p->y_dtype, (t0 + t) * N + r0, nr, out + t * SQ_PK_ROWS);
            }
        }
    }
    free(xs);
    free(xsum);
    return SQ_OK;
}

#endif /* x86 */
