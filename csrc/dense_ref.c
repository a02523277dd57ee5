/*
 * dense_ref.c: y = x W^T for a dense bfloat16 W, the scalar reference of sq_dense.h: 16 lane sums
 * per row and token in the order the header states, then its lane tree.
 */
#include <math.h>

#include "sq_common.h"
#include "sq_dense.h"

/* nr rows, one at a time: the 16 lanes, then the tree */
static void rows_dot(const uint16_t *wr, int64_t K, int nr, const float *xt, float *out, int pf) {
    (void)pf;
    for (int i = 0; i < nr; ++i) {
        float acc[SQ_DN_LANES] = {0.0f};
        for (int64_t k = 0; k < K; ++k)
            acc[k % SQ_DN_LANES] = fmaf(sq_bf16_to_f32(wr[i * K + k]), xt[k], acc[k % SQ_DN_LANES]);
        out[i] = sq_dn_reduce(acc);
    }
}

int sq_dn_matmul_ref(const sq_dn_params *p, const uint16_t *w, const void *x, void *y) {
    return sq_dn_run(p, w, x, y, rows_dot);
}
