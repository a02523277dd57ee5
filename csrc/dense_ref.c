/*
 * dense_ref.c: y = x W^T for a dense bfloat16 W, the scalar reference of sq_dense.h: 16 lane sums
 * per row and token in the order the header states, then its lane tree.
 */
#include <math.h>

#include "sq_common.h"
#include "sq_dense.h"

int sq_dn_matmul_ref(const sq_dn_params *p, const uint16_t *w, const void *x, void *y) {
    int st = sq_dn_check(p);
    if (st) return st;
    const int64_t T = p->tokens, N = p->rows, K = p->cols;
    if (T == 0 || N == 0) return SQ_OK;
    const float *xf;
    float *owned;
    if ((st = sq_dn_x_f32(p, x, &xf, &owned))) return st;
    const int nt = sq_dn_threads(p);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < N; ++r) {
        const uint16_t *wr = w + r * K;
        for (int64_t t = 0; t < T; ++t) {
            float acc[SQ_DN_LANES] = {0.0f};
            for (int64_t k = 0; k < K; ++k)
                acc[k % SQ_DN_LANES] = fmaf(sq_bf16_to_f32(wr[k]), xf[t * K + k], acc[k % SQ_DN_LANES]);
            sq_store(y, p->y_dtype, t * N + r, sq_dn_reduce(acc));
        }
    }
    free(owned);
    return SQ_OK;
}
