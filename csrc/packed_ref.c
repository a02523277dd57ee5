/*
 * packed_ref.c: y = x W^T with W in the packed low-bit layout of sq_packed.h, the scalar reference.
 * The source of truth: each code is decoded on its own and added with one fmaf in the storage
 * order that sq_packed.h states, so the SIMD twins agree with it bit for bit on finite inputs.
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

/* sum over one unit of one row: codes times x in storage order */
static float unit_dot_ref(const uint32_t *words, int lane, int bits, const float *xu, float acc) {
    if (bits == 3) {
        for (int j = 0; j < 2; ++j) {
            const uint32_t w = words[j * SQ_PK_ROWS + lane];
            for (int c = 0; c < 16; ++c) acc = fmaf((float)((w >> (2 * c)) & 3u), xu[j * 16 + c], acc);
        }
        const uint32_t w = words[2 * SQ_PK_ROWS + lane];
        for (int c = 0; c < 32; ++c) acc = fmaf((float)((w >> c) & 1u), 4.0f * xu[c], acc);
        return acc;
    }
    const int cpw = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    for (int j = 0; j < bits; ++j) {
        const uint32_t w = words[j * SQ_PK_ROWS + lane];
        for (int c = 0; c < cpw; ++c) acc = fmaf((float)((w >> (bits * c)) & mask), xu[j * cpw + c], acc);
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
    float *xf = sq_alloc((size_t)(T * K) * sizeof(float));
    float *xsum = sq_alloc((size_t)(T * G) * sizeof(float));
    if (!xf || !xsum) {
        free(xf);
        free(xsum);
        return SQ_ERR_NOMEM;
    }
    for (int64_t t = 0; t < T; ++t) {
        sq_pk_prepare_token(p, x, t, NULL, xsum + t * G);
        for (int64_t k = 0; k < K; ++k) xf[t * K + k] = sq_pk_x(x, p->x_dtype, t * K + k);
    }
    const int nt = sq_threads(p->nthreads, N);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N; ++r) {
        const int64_t rb = r / SQ_PK_ROWS;
        const int lane = (int)(r % SQ_PK_ROWS);
        for (int64_t t = 0; t < T; ++t) {
            float total = 0.0f;
            for (int64_t g = 0; g < G; ++g) {
                float acc = 0.0f;
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
