/*
 * packed_avx512.c: sq_pk_matmul_ref with AVX-512F: one zmm holds the 16 rows of a row block.
 * bits = 2, 4, 8: a word load gives 16 rows' codes, each field is one AND (or shift) and one
 * convert, and the convert feeds one FMA per token of the token block (up to 8 tokens share each
 * unpacked field: prefill); products are field * (x * 2^-offset) = q * x exactly, so the sums equal
 * the reference's.  Decode (one token) runs four chains of FMAs per group (bits = 4, 8), and for
 * bits = 2 one shift, one permute (vpermps: the low 4 bits of each lane, a column pair's codes,
 * pick one of the pair's 16 precomputed products) and one add per pair of columns and 16 rows:
 * 1.5 ops a column where 4 bits need 3.  bits = 3: bit planes, one kmov and one masked add per
 * plane and column; with more than one token each code is rebuilt from its masks (2-3 ops) and
 * shared over up to 8 tokens' FMAs, in the order sq_packed.h states for that case.
 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx2,fma")
#include <immintrin.h>

#include "sq_common.h"
#include "sq_packed.h"

#define TB_MAX 8
/* decode: software prefetch, in words (64-byte lines) ahead of the one in use, of a stream of codes:
 * one stream per thread (4, 8 bits) or four interleaved (2 bits); measured best on this machine's
 * DRAM-bound 4096 x 4096 GEMV (the hardware prefetcher alone left W4 at ~12 GB/s) */
#define SQ_PK_PREFETCH_ONE 48
#define SQ_PK_PREFETCH_FOUR 16
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
            const float *xu = xs + u * SQ_PK_UNIT;
            if (sq_pk_planar(bits)) { /* prefill from planes: the code as a float, then one FMA per token */
                const uint16_t *m = (const uint16_t *)w;
#pragma GCC unroll 32
                for (int c = 0; c < SQ_PK_UNIT; ++c) {
                    __m512 fv = _mm512_maskz_mov_ps(_load_mask16((__mmask16 *)(m + c)), _mm512_set1_ps(1.0f));
                    fv = _mm512_mask_add_ps(fv, _load_mask16((__mmask16 *)(m + SQ_PK_UNIT + c)), fv,
                                            _mm512_set1_ps(2.0f));
                    if (bits == 3)
                        fv = _mm512_mask_add_ps(fv, _load_mask16((__mmask16 *)(m + 2 * SQ_PK_UNIT + c)), fv,
                                                _mm512_set1_ps(4.0f));
                    for (int t = 0; t < tb; ++t) acc[t] = _mm512_fmadd_ps(fv, _mm512_set1_ps(xu[t * xstride + c]), acc[t]);
                }
                continue;
            }
            const int cpw = 32 / bits;
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

/* bits = 4, 8, one token: one row block, SQ_PK_WCHAINS chains per group (word i -> chain i % 4);
 * bits = 2 goes through decode2x512 below */
SQ_INLINE void decode512(const int bits, const uint32_t *qrb, const float *smrb, int64_t G, int64_t upg,
                         int64_t group, const float *xs, const float *xsum, float *out) {
    const int64_t wpg = upg * bits;
    const int cpw = 32 / bits;
    __m512 total = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        const uint32_t *w = qrb + g * wpg * SQ_PK_ROWS;
        const float *xg = xs + g * group;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define WD(i, a)                                                                                                   \
    do {                                                                                                           \
        _mm_prefetch((const char *)(w + ((i) + SQ_PK_PREFETCH_ONE) * SQ_PK_ROWS), _MM_HINT_T0);                    \
        word_fma512(_mm512_loadu_si512(w + (i) * SQ_PK_ROWS), bits, cpw, xg + (i) * cpw, 0, 1, &a);               \
    } while (0)
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
        const __m512 dot = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        total = _mm512_fmadd_ps(dot, _mm512_loadu_ps(smrb + g * 2 * SQ_PK_ROWS), total);
        total = _mm512_fmadd_ps(_mm512_loadu_ps(smrb + g * 2 * SQ_PK_ROWS + SQ_PK_ROWS), _mm512_set1_ps(xsum[g]), total);
    }
    _mm512_storeu_ps(out, total);
}

typedef void (*decode_fn)(const uint32_t *, const float *, int64_t, int64_t, int64_t, const float *, const float *,
                          float *);
#define DEF_DEC(B)                                                                                                 \
    static void dec512_##B(const uint32_t *q, const float *sm, int64_t G, int64_t upg, int64_t group,               \
                           const float *xs, const float *xsum, float *out) {                                        \
        decode512(B, q, sm, G, upg, group, xs, xsum, out);                                                         \
    }
DEF_DEC(4)
DEF_DEC(8)

/* bits = 2, one token: nrb (1-4) row blocks at stride rbq words share each word's 8 table vectors
 * (loaded once from L2 for up to 64 rows, where one block per load would read 8 table lines per line
 * of codes); per block the same chains and order as decode512 */
SQ_INLINE void decode2x512(const int nrb, const uint32_t *qrb, int64_t rbq, const float *smrb, int64_t rbs,
                           int64_t G, int64_t upg, int64_t group, const float *tab, const float *xsum, float *out) {
    const int64_t wpg = upg * 2;
    __m512 total[4];
    for (int r = 0; r < nrb; ++r) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        const uint32_t *w = qrb + g * wpg * SQ_PK_ROWS;
        const float *tg = tab + g * group * 8;
        __m512 a[4][SQ_PK_WCHAINS];
        for (int r = 0; r < nrb; ++r)
            for (int c = 0; c < SQ_PK_WCHAINS; ++c) a[r][c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < wpg; ++i) {
            __m512 t[8];
#pragma GCC unroll 8
            for (int n = 0; n < 8; ++n) t[n] = _mm512_loadu_ps(tg + i * 128 + 16 * n);
            const int ch = (int)(i % SQ_PK_WCHAINS);
#pragma GCC unroll 4
            for (int r = 0; r < nrb; ++r) {
                const uint32_t *wp = w + r * rbq + i * SQ_PK_ROWS;
                _mm_prefetch((const char *)(wp + SQ_PK_PREFETCH_FOUR * SQ_PK_ROWS), _MM_HINT_T0);
                const __m512i v = _mm512_loadu_si512(wp);
                __m512 acc = a[r][ch];
#pragma GCC unroll 8
                for (int n = 0; n < 8; ++n)
                    acc = _mm512_add_ps(acc, _mm512_permutexvar_ps(n == 0 ? v : _mm512_srli_epi32(v, (unsigned)(4 * n)), t[n]));
                a[r][ch] = acc;
            }
        }
        for (int r = 0; r < nrb; ++r) {
            const float *sm = smrb + r * rbs + g * 2 * SQ_PK_ROWS;
            const __m512 dot = _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3]));
            total[r] = _mm512_fmadd_ps(dot, _mm512_loadu_ps(sm), total[r]);
            total[r] = _mm512_fmadd_ps(_mm512_loadu_ps(sm + SQ_PK_ROWS), _mm512_set1_ps(xsum[g]), total[r]);
        }
    }
    for (int r = 0; r < nrb; ++r) _mm512_storeu_ps(out + r * SQ_PK_ROWS, total[r]);
}

typedef void (*decode2_fn)(const uint32_t *, int64_t, const float *, int64_t, int64_t, int64_t, int64_t, const float *,
                           const float *, float *);
#define DEF_DEC2(R)                                                                                                \
    static void dec2x512_##R(const uint32_t *q, int64_t rbq, const float *sm, int64_t rbs, int64_t G, int64_t upg,  \
                             int64_t group, const float *tab, const float *xsum, float *out) {                      \
        decode2x512(R, q, rbq, sm, rbs, G, upg, group, tab, xsum, out);                                             \
    }
DEF_DEC2(1)
DEF_DEC2(2)
DEF_DEC2(3)
DEF_DEC2(4)
static const decode2_fn dec2_fns[4] = {dec2x512_1, dec2x512_2, dec2x512_3, dec2x512_4};

/* bits = 2, decode: every column pair's 16 products, tab[16 i + q0 + 4 q1] = fma(q1, x1, q0 * x0),
 * as sq_pk_pair_table computes them */
static void pair_tables512(const sq_pk_params *p, const void *x, float *tab) {
    const __m512 lo = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    const __m512 hi = _mm512_setr_ps(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int64_t i = 0; i < p->cols / 2; ++i) {
        const __m512 x0 = _mm512_set1_ps(sq_pk_x(x, p->x_dtype, 2 * i));
        const __m512 x1 = _mm512_set1_ps(sq_pk_x(x, p->x_dtype, 2 * i + 1));
        _mm512_storeu_ps(tab + 16 * i, _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0)));
    }
}

/* acc += x in the rows whose bit is set in the 16-bit mask at mem: kmovw from memory and one
 * masked add (written out: GCC 12 loads the mask through a general register, a port-5 kmov) */
#define PLANE_ADD(acc, mem, xb)                                                                                   \
    __asm__("kmovw %[mk], %%k1\n\tvaddps %[x], %[a], %[a]%{%%k1%}" : [a] "+v"(acc) : [mk] "m"(mem), [x] "v"(xb) : "k1")

/* bits = 3: tb tokens times nrb row blocks (slot i = t * nrb + r into out + 16 i, at most 4 slots)
 * from bit planes.  Per column, a plane's 16-bit row mask goes from memory into a mask register and
 * one masked add puts x into that plane's partial sum: `bits` adds per column and 16 rows.  In
 * decode up to four row blocks share each broadcast of x (else loads, not adds, would limit it) */
SQ_INLINE void planes512(const int bits, const int tb, const int nrb, const uint32_t *qrb, int64_t rbq,
                         const float *smrb, int64_t rbs, int64_t G, int64_t upg, const float *xs, int64_t xstride,
                         const float *xsum, float *out) {
    __m512 total[4], acc[4][3][SQ_PK_CHAINS];
    const int n = tb * nrb;
    for (int i = 0; i < n; ++i) total[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        for (int i = 0; i < n; ++i)
            for (int b = 0; b < bits; ++b)
                for (int s = 0; s < SQ_PK_CHAINS; ++s) acc[i][b][s] = _mm512_setzero_ps();
        /* one pointer per row block (immediate offsets in the loop); blocks past nrb repeat block 0 */
        const uint16_t *m0 = (const uint16_t *)(qrb + g * upg * bits * SQ_PK_ROWS);
        const uint16_t *m1 = nrb > 1 ? m0 + 2 * rbq : m0, *m2 = nrb > 2 ? m0 + 4 * rbq : m0,
                       *m3 = nrb > 3 ? m0 + 6 * rbq : m0;
        const float *xu = xs + g * upg * SQ_PK_UNIT;
        for (int64_t u = 0; u < upg; ++u) {
#pragma GCC unroll 32
            for (int c = 0; c < SQ_PK_UNIT; ++c) {
                for (int t = 0; t < tb; ++t) {
                    const __m512 xb = _mm512_set1_ps(xu[t * xstride + c]);
                    for (int r = 0; r < nrb; ++r) {
                        const uint16_t *m = r == 0 ? m0 : r == 1 ? m1 : r == 2 ? m2 : m3;
                        for (int b = 0; b < bits; ++b)
                            PLANE_ADD(acc[t * nrb + r][b][c % SQ_PK_CHAINS], m[b * SQ_PK_UNIT + c], xb);
                    }
                }
            }
            m0 += bits * SQ_PK_UNIT, m1 += bits * SQ_PK_UNIT, m2 += bits * SQ_PK_UNIT, m3 += bits * SQ_PK_UNIT;
            xu += SQ_PK_UNIT;
        }
        for (int i = 0; i < n; ++i) {
            const int t = i / nrb, r = i % nrb;
            const float *sm = smrb + r * rbs + g * 2 * SQ_PK_ROWS;
            __m512 dot = _mm512_setzero_ps();
            for (int b = 0; b < bits; ++b)
                dot = _mm512_fmadd_ps(_mm512_set1_ps(sq_pk_pow2(b)), _mm512_add_ps(acc[i][b][0], acc[i][b][1]), dot);
            total[i] = _mm512_fmadd_ps(dot, _mm512_loadu_ps(sm), total[i]);
            total[i] = _mm512_fmadd_ps(_mm512_loadu_ps(sm + SQ_PK_ROWS), _mm512_set1_ps(xsum[t * G + g]), total[i]);
        }
    }
    for (int i = 0; i < n; ++i) _mm512_storeu_ps(out + i * SQ_PK_ROWS, total[i]);
}

typedef void (*planes_fn)(const uint32_t *, int64_t, const float *, int64_t, int64_t, int64_t, const float *,
                          const float *, float *);
#define DEF_PL(B, R)                                                                                               \
    static void pl512_##B##_##R(const uint32_t *q, int64_t rbq, const float *sm, int64_t rbs, int64_t G,            \
                                int64_t upg, const float *xs, const float *xsum, float *out) {                      \
        planes512(B, 1, R, q, rbq, sm, rbs, G, upg, xs, 0, xsum, out);                                              \
    }
DEF_PL(3, 1)
DEF_PL(3, 2)
DEF_PL(3, 3)
DEF_PL(3, 4)
#define PL_RB 4 /* row blocks per call in decode */
static const planes_fn pl_fns[PL_RB] = {pl512_3_1, pl512_3_2, pl512_3_3, pl512_3_4};

typedef void (*row_block_fn)(const uint32_t *, const float *, int64_t, int64_t, const float *, int64_t, const float *,
                             float *);

#define DEF_RB(B, TB)                                                                                              \
    static void rb512_##B##_##TB(const uint32_t *q, const float *sm, int64_t G, int64_t upg, const float *xs,        \
                                 int64_t xstride, const float *xsum, float *out) {                                  \
        row_block512(B, TB, q, sm, G, upg, xs, xstride, xsum, out);                                                 \
    }
#define DEF_BITS(B) DEF_RB(B, 1) DEF_RB(B, 2) DEF_RB(B, 3) DEF_RB(B, 4) DEF_RB(B, 5) DEF_RB(B, 6) DEF_RB(B, 7) DEF_RB(B, 8)
DEF_BITS(2)
DEF_BITS(3)
DEF_BITS(4)
DEF_BITS(8)
#define ROW_FNS(B) {rb512_##B##_1, rb512_##B##_2, rb512_##B##_3, rb512_##B##_4, rb512_##B##_5, rb512_##B##_6, rb512_##B##_7, rb512_##B##_8}
static const row_block_fn fns[4][TB_MAX] = {ROW_FNS(2), ROW_FNS(3), ROW_FNS(4), ROW_FNS(8)};

int sq_pk_matmul_avx512(const sq_pk_params *p, const uint32_t *qweight, const float *scale_min, const void *x,
                        void *y) {
    int st = sq_pk_check(p);
    if (st) return st;
    const int64_t T = p->tokens, N = p->rows, K = p->cols, G = K / p->group, upg = p->group / SQ_PK_UNIT;
    const int64_t NU = K / SQ_PK_UNIT, NB = sq_pk_row_blocks(N), XL = sq_pk_xs_len(p);
    if (T == 0 || N == 0) return SQ_OK;
    float *xs, *xsum;
    if ((st = sq_pk_scratch(p, XL, &xs, &xsum))) return st;
    const row_block_fn *fn = fns[p->bits == 2 ? 0 : p->bits == 3 ? 1 : p->bits == 4 ? 2 : 3];
    const int tbmax = TB_MAX;
    const int nt = sq_threads(p->nthreads, sq_pk_thread_items(p, NB > T ? NB : T));
    /* a few tokens (decode) are prepared serially: a barrier costs more than K elements; the row
     * blocks go in small dynamic chunks so a thread the OS preempts does not hold up the others */
    const int serial_prep = T * K < (1 << 16), fields_decode = T == 1 && !sq_pk_planar(p->bits);
    if (serial_prep || fields_decode)
        for (int64_t t = 0; t < T; ++t) sq_pk_prepare_token(p, x, t, xs + t * XL, xsum + t * G);
    float *tab = NULL;
    if (fields_decode && p->bits == 2) {
        if (!(tab = (float *)sq_alloc((size_t)K * 8 * sizeof(float)))) {
            free(xs);
            free(xsum);
            return SQ_ERR_NOMEM;
        }
        pair_tables512(p, x, tab);
    }
    if (fields_decode && p->bits == 2) { /* one token, 2 bits: row blocks in fours share the table loads */
        const int64_t rbq = NU * 2 * SQ_PK_ROWS, rbs = G * 2 * SQ_PK_ROWS;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int64_t quad = 0; quad < (NB + 3) / 4; ++quad) {
            float out[4 * SQ_PK_ROWS];
            const int64_t rb = 4 * quad, r0 = rb * SQ_PK_ROWS;
            const int nrb = (int)(NB - rb < 4 ? NB - rb : 4);
            const int64_t nr = N - r0 < nrb * SQ_PK_ROWS ? N - r0 : nrb * SQ_PK_ROWS;
            dec2_fns[nrb - 1](qweight + rb * rbq, rbq, scale_min + rb * rbs, rbs, G, upg, p->group, tab, xsum, out);
            sq_pk_store_rows(y, p->y_dtype, r0, nr, out);
        }
        free(tab);
        free(xs);
        free(xsum);
        return SQ_OK;
    }
    if (fields_decode) { /* one token: row blocks, four chains per group */
        const decode_fn dfn = p->bits == 4 ? dec512_4 : dec512_8;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4)
        for (int64_t rb = 0; rb < NB; ++rb) {
            float out[SQ_PK_ROWS];
            const int64_t r0 = rb * SQ_PK_ROWS, nr = N - r0 < SQ_PK_ROWS ? N - r0 : SQ_PK_ROWS;
            dfn(qweight + rb * NU * p->bits * SQ_PK_ROWS, scale_min + rb * G * 2 * SQ_PK_ROWS, G, upg, p->group, xs, xsum,
                out);
            sq_pk_store_rows(y, p->y_dtype, r0, nr, out);
        }
        free(xs);
        free(xsum);
        return SQ_OK;
    }
#pragma omp parallel num_threads(nt)
    {
        if (!serial_prep) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; ++t) sq_pk_prepare_token(p, x, t, xs + t * XL, xsum + t * G);
        }
        float out[TB_MAX * SQ_PK_ROWS];
        if (sq_pk_planar(p->bits) && T == 1) { /* decode: row blocks in fours */
            const int64_t rbq = NU * p->bits * SQ_PK_ROWS, rbs = G * 2 * SQ_PK_ROWS;
#pragma omp for schedule(dynamic, 1)
            for (int64_t quad = 0; quad < (NB + PL_RB - 1) / PL_RB; ++quad) {
                const int64_t rb = PL_RB * quad, r0 = rb * SQ_PK_ROWS;
                const int nrb = (int)(NB - rb < PL_RB ? NB - rb : PL_RB);
                const int64_t nr = N - r0 < nrb * SQ_PK_ROWS ? N - r0 : nrb * SQ_PK_ROWS;
                pl_fns[nrb - 1](qweight + rb * rbq, rbq, scale_min + rb * rbs, rbs, G, upg, xs, xsum, out);
                sq_pk_store_rows(y, p->y_dtype, r0, nr, out);
            }
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t rb = 0; rb < (sq_pk_planar(p->bits) && T == 1 ? 0 : NB); ++rb) {
            const int64_t r0 = rb * SQ_PK_ROWS, nr = N - r0 < SQ_PK_ROWS ? N - r0 : SQ_PK_ROWS;
            for (int64_t t0 = 0; t0 < T; t0 += tbmax) {
                const int tb = (int)(T - t0 < tbmax ? T - t0 : tbmax);
                fn[tb - 1](qweight + rb * NU * p->bits * SQ_PK_ROWS, scale_min + rb * G * 2 * SQ_PK_ROWS, G, upg,
                           xs + t0 * XL, XL, xsum + t0 * G, out);
                for (int t = 0; t < tb; ++t) sq_pk_store_rows(y, p->y_dtype, (t0 + t) * N + r0, nr, out + t * SQ_PK_ROWS);
            }
        }
    }
    free(xs);
    free(xsum);
    return SQ_OK;
}

#endif /* x86 */
