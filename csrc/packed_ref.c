/*
 * packed_ref.c: y = x W^T with W in the packed low-bit layout of sq_packed.h, the scalar reference.
 * The source of truth: each code (bits = 2, 4, 8) or code bit (bits = 3)
 * is decoded on its own and summed in the order that sq_packed.h states, so the SIMD twins agree with it bit for bit on finite inputs.
 */
#include <math.h>

#include "sq_common.h"
#include "sq_packed.h"

static void store_y(void *y, sq_dtype dt, int64_t idx, float v) {
    if (dt == SQ_F32)
        ((float *)y)[idx] = v;
    else
        ((uint16_t *)y)[idx] = sq_f32_to_bf16(v);
}

/* sum over one unit of one row (bits = 2, 4, 8; prefill): codes times x in storage order */
static float unit_dot_ref(const uint32_t *words, int lane, int bits, const float *xu, float acc) {
    const int cpw = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    for (int j = 0; j < bits; ++j) {
        const uint32_t w = words[j * SQ_PK_ROWS + lane];
        for (int c = 0; c < cpw; ++c) acc = fmaf((float)((w >> (bits * c)) & mask), xu[j * cpw + c], acc);
    }
    return acc;
}

/* one group of one row (bits = 2, 4, 8; decode): four chains over the group's words, as sq_packed.h
 * states; qg is the group's first word of the row block, xg the group's x */
static float group_dot_decode_ref(const uint32_t *qg, int lane, int bits, int64_t words, const float *xg) {
    float acc[SQ_PK_WCHAINS] = {0.0f};
    const int cpw = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t i = 0; i < words; ++i) {
        const uint32_t w = qg[i * SQ_PK_ROWS + lane];
        const float *xw = xg + i * cpw;
        float a = acc[i % SQ_PK_WCHAINS];
        if (bits == 2) {
            for (int c = 0; c < cpw; c += 2) {
                const float p = fmaf((float)((w >> (2 * c + 2)) & 3u), xw[c + 1], (float)((w >> (2 * c)) & 3u) * xw[c]);
                a = a + p;
            }
        } else {
            for (int c = 0; c < cpw; ++c) a = fmaf((float)((w >> (bits * c)) & mask), xw[c], a);
        }
        acc[i % SQ_PK_WCHAINS] = a;
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* one group of one row (bits = 3: bit planes): the partial sums of sq_packed.h */
static float group_dot_planes_ref(const uint32_t *qrb, int lane, int bits, int64_t u0, int64_t upg, const float *xg) {
    float acc[3][SQ_PK_CHAINS] = {{0.0f}};
    for (int64_t u = 0; u < upg; ++u) {
        const uint16_t *m = (const uint16_t *)(qrb + (u0 + u) * bits * SQ_PK_ROWS);
        for (int c = 0; c < SQ_PK_UNIT; ++c)
            for (int b = 0; b < bits; ++b)
                if ((m[b * SQ_PK_UNIT + c] >> lane) & 1u) acc[b][c % SQ_PK_CHAINS] += xg[u * SQ_PK_UNIT + c];
    }
    float dot = 0.0f;
    for (int b = 0; b < bits; ++b) dot = fmaf(sq_pk_pow2(b), acc[b][0] + acc[b][1], dot);
    return dot;
}

/* one group of one row (bits = 3) in a call of more than one token: codes from the planes, one
 * fmaf per code in column order */
static float group_dot_codes_ref(const uint32_t *qrb, int lane, int bits, int64_t u0, int64_t upg, const float *xg) {
    float acc = 0.0f;
    for (int64_t u = 0; u < upg; ++u) {
        const uint16_t *m = (const uint16_t *)(qrb + (u0 + u) * bits * SQ_PK_ROWS);
        for (int c = 0; c < SQ_PK_UNIT; ++c) {
            unsigned q = 0;
            for (int b = 0; b < bits; ++b) q |= ((m[b * SQ_PK_UNIT + c] >> lane) & 1u) << b;
            acc = fmaf((float)q, xg[u * SQ_PK_UNIT + c], acc);
        }
    }
    return acc;
}

int sq_pk_matmul_ref(const sq_pk_params *p, const uint32_t *qweight, const float *scale_min, const void *x,
                     void *y) {
    int st = sq_pk_check(p);
    if (st) return st;
    const int64_t T = p->tokens, N = p->rows, K = p->cols, G = K / p->group, upg = p->group / SQ_PK_UNIT;
    const int64_t NU = K / SQ_PK_UNIT;
    if (T == 0 || N == 0) return SQ_OK;
    float *xf, *xsum;
    if ((st = sq_pk_scratch(p, K, &xf, &xsum))) return st;
    for (int64_t t = 0; t < T; ++t) {
        sq_pk_prepare_token(p, x, t, NULL, xsum + t * G);
        for (int64_t k = 0; k < K; ++k) xf[t * K + k] = sq_pk_x(x, p->x_dtype, t * K + k);
    }
    const int nt = sq_threads(p->nthreads, sq_pk_thread_items(p, N));
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N; ++r) {
        const int64_t rb = r / SQ_PK_ROWS;
        const int lane = (int)(r % SQ_PK_ROWS);
        for (int64_t t = 0; t < T; ++t) {
            float total = 0.0f;
            for (int64_t g = 0; g < G; ++g) {
                float acc = 0.0f;
                if (sq_pk_planar(p->bits) && T > 1)
                    acc = group_dot_codes_ref(qweight + rb * NU * p->bits * SQ_PK_ROWS, lane, p->bits, g * upg, upg,
                                              xf + t * K + g * p->group);
                else if (sq_pk_planar(p->bits))
                    acc = group_dot_planes_ref(qweight + rb * NU * p->bits * SQ_PK_ROWS, lane, p->bits, g * upg, upg,
                                               xf + t * K + g * p->group);
                else if (T == 1)
                    acc = group_dot_decode_ref(qweight + (rb * NU + g * upg) * p->bits * SQ_PK_ROWS, lane, p->bits,
                                               upg * p->bits, xf + g * p->group);
                else
                    for (int64_t u = g * upg; u < (g + 1) * upg; ++u)
                        acc = unit_dot_ref(qweight + (rb * NU + u) * p->bits * SQ_PK_ROWS, lane, p->bits,
                                           xf + t * K + u * SQ_PK_UNIT, acc);
                const float *sm = scale_min + (rb * G + g) * 2 * SQ_PK_ROWS;
                total = fmaf(acc, sm[lane], total);
                total = fmaf(sm[SQ_PK_ROWS + lane], xsum[t * G + g], total);
            }
            store_y(y, p->y_dtype, t * N + r, total);
        }
    }
    free(xf);
    free(xsum);
    return SQ_OK;
}
