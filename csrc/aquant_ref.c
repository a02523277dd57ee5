/*
 * aquant_ref.c: per-token dynamic activation fake quantization of X / alpha, scalar reference.
 * Each row (token) of X (rows x cols) gets its own min/max grid (no clipping factors); only the
 * first n_quant channels are quantized.  Backward: straight-through for X plus the gradient
 * through the token's min/max via the scale, and the gradient of the channel scale alpha.
 */
#include "sq_common.h"

static int row_grid(const sq_aq_params *p, const float *xt, sq_grid *g) {
    float mx = xt[0], mn = xt[0];
    int finite = 1;
    for (int64_t c = 0; c < p->cols; ++c) {
        finite &= isfinite(xt[c]) != 0;
        mx = fmaxf(mx, xt[c]);
        mn = fminf(mn, xt[c]);
    }
    if (!finite) return SQ_ERR_NONFINITE_INPUT;
    return sq_grid_make(mx, mn, NULL, NULL, p->bits, p->symmetric, g);
}

static void load_row(const sq_aq_params *p, const void *x, const float *alpha, int64_t i, float *xt) {
    for (int64_t c = 0; c < p->cols; ++c) {
        const float v = sq_load(x, p->dtype, i * p->cols + c);
        xt[c] = alpha ? v / alpha[c] : v;
    }
}

int sq_aq_forward_ref(const sq_aq_params *p, const void *x, const float *alpha, void *out) {
    const int64_t rows = p->rows, cols = p->cols;
    const int nt = sq_threads(p->nthreads, rows);
    sq_scratch sc;
    if (sq_scratch_init(&sc, nt, cols) != SQ_OK) return SQ_ERR_NOMEM;
    int status = SQ_OK;
#pragma omp parallel num_threads(nt)
    {
        float *xt = sq_scratch_thread(&sc, SQ_THREAD_ID());
#pragma omp for schedule(dynamic, SQ_ROW_CHUNK)
        for (int64_t i = 0; i < rows; ++i) {
            load_row(p, x, alpha, i, xt);
            sq_grid g;
            int st = row_grid(p, xt, &g);
            if (st != SQ_OK) {
#pragma omp atomic write
                status = st;
                continue;
            }
            for (int64_t c = 0; c < p->n_quant; ++c) sq_store(out, p->dtype, i * cols + c, sq_grid_apply(&g, xt[c]));
            for (int64_t c = p->n_quant; c < cols; ++c) sq_store(out, p->dtype, i * cols + c, xt[c]);
        }
    }
    free(sc.base);
    return status;
}

int sq_aq_backward_ref(const sq_aq_params *p, const void *x, const float *alpha, const void *grad_out,
                       void *grad_x, float *grad_alpha) {
    const int64_t rows = p->rows, cols = p->cols;
    const int nt = sq_threads(p->nthreads, rows);
    const int nslots = sq_slots(rows);
    sq_scratch sc, acc; /* per thread: xt and dL/dXt rows; per slot: the alpha accumulator */
    if (sq_scratch_init(&sc, nt, 2 * cols) != SQ_OK) return SQ_ERR_NOMEM;
    if (sq_scratch_init(&acc, nslots, cols) != SQ_OK) {
        free(sc.base);
        return SQ_ERR_NOMEM;
    }
    int status = SQ_OK;
#pragma omp parallel num_threads(nt)
    {
        float *xt = sq_scratch_thread(&sc, SQ_THREAD_ID());
        float *gxt = xt + cols;
#pragma omp for schedule(dynamic, 1)
        for (int slot = 0; slot < nslots; ++slot) {
        float *acc_alpha = sq_scratch_thread(&acc, slot);
        for (int64_t i = sq_slot_begin(rows, slot, nslots); i < sq_slot_begin(rows, slot + 1, nslots); ++i) {
            load_row(p, x, alpha, i, xt);
            sq_grid g;
            int st = row_grid(p, xt, &g);
            if (st != SQ_OK) {
#pragma omp atomic write
                status = st;
                continue;
            }
            float ds = 0.0f;
            for (int64_t c = 0; c < p->n_quant; ++c) {
                const float go = sq_load(grad_out, p->dtype, i * cols + c);
                const float t = xt[c] / g.s;
                const float xi = nearbyintf(t) + g.z;
                const int inside = xi >= g.qmin && xi <= g.qmax;
                const float q = fminf(fmaxf(xi, g.qmin), g.qmax);
                gxt[c] = inside ? go : 0.0f;
                ds += go * ((q - g.z) - (inside ? t : 0.0f));
            }
            for (int64_t c = p->n_quant; c < cols; ++c) gxt[c] = sq_load(grad_out, p->dtype, i * cols + c);
            if (p->n_quant > 0) {
                float du, dl, dmx, dmn;
                sq_grid_backward(&g, p->symmetric, 0, 0, ds, &du, &dl, &dmx, &dmn);
                int64_t n_mx = 0, n_mn = 0;
                for (int64_t c = 0; c < cols; ++c) {
                    n_mx += xt[c] == g.mx;
                    n_mn += xt[c] == g.mn;
                }
                const float share_mx = dmx / (float)n_mx, share_mn = dmn / (float)n_mn;
                for (int64_t c = 0; c < cols; ++c) {
                    if (xt[c] == g.mx) gxt[c] += share_mx;
                    if (xt[c] == g.mn) gxt[c] += share_mn;
                }
            }
            for (int64_t c = 0; c < cols; ++c) {
                if (grad_x) sq_store(grad_x, p->dtype, i * cols + c, alpha ? gxt[c] / alpha[c] : gxt[c]);
                if (grad_alpha) {
                    const float xv = sq_load(x, p->dtype, i * cols + c);
                    acc_alpha[c] += (-gxt[c] * xv) / (alpha[c] * alpha[c]);
                }
            }
        }
        }
    }
    if (status == SQ_OK && grad_alpha) sq_scratch_reduce(&acc, nslots, 0, cols, grad_alpha);
    free(sc.base);
    free(acc.base);
    return status;
}
