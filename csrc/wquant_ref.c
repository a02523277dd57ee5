/*
 * wquant_ref.c: weight fake quantization with LWC, channel scaling and LoRA, scalar reference.
 * The source of truth for wquant_avx2.c; the math is documented in sq_kernels.h.
 */
#include "sq_common.h"

/* wt[c] = W[i, c] * alpha[c] + lora_scaling * sum_k B[i, k] A[k, c] */
static void transform_row(const sq_wq_params *p, const sq_wq_inputs *in, int64_t i, float *wt) {
    const int64_t cols = p->cols;
    for (int64_t c = 0; c < cols; ++c) {
        float v = sq_load(in->w, p->dtype, i * cols + c);
        if (in->alpha) v *= in->alpha[c];
        if (p->rank) {
            float acc = 0.0f;
            for (int k = 0; k < p->rank; ++k) acc += in->lora_b[i * p->rank + k] * in->lora_a[k * cols + c];
            v += p->lora_scaling * acc;
        }
        wt[c] = v;
    }
}

static int group_grid(const sq_wq_params *p, const sq_wq_inputs *in, const float *x, int64_t i,
                      int64_t j, int64_t n_groups, sq_grid *g) {
    float mx = x[0], mn = x[0];
    int finite = 1;
    for (int64_t c = 0; c < p->group; ++c) {
        finite &= isfinite(x[c]) != 0;
        mx = fmaxf(mx, x[c]);
        mn = fminf(mn, x[c]);
    }
    if (!finite) return SQ_ERR_NONFINITE_INPUT;
    return sq_grid_make_lwc(mx, mn, in->lwc_u ? in->lwc_u + i * n_groups + j : NULL,
                            in->lwc_l ? in->lwc_l + i * n_groups + j : NULL, p->lwc_linear, p->bits, p->symmetric, g);
}

int sq_wq_forward_ref(const sq_wq_params *p, const sq_wq_inputs *in, void *out) {
    const int64_t rows = p->rows, cols = p->cols, n_groups = cols / p->group;
    const int nt = sq_threads(p->nthreads, rows);
    int status = SQ_OK;
#pragma omp parallel num_threads(nt)
    {
        float *wt = (float *)sq_alloc((size_t)cols * sizeof(float));
        if (!wt) {
#pragma omp atomic write
            status = SQ_ERR_NOMEM;
        }
#pragma omp for schedule(dynamic, SQ_ROW_CHUNK)
        for (int64_t i = 0; i < rows; ++i) {
            if (!wt) continue;
            transform_row(p, in, i, wt);
            for (int64_t j = 0; j < n_groups; ++j) {
                const int64_t c0 = j * p->group, c1 = c0 + p->group;
                const int64_t cq = c1 < p->n_quant ? c1 : (p->n_quant > c0 ? p->n_quant : c0);
                sq_grid g;
                int st = group_grid(p, in, wt + c0, i, j, n_groups, &g);
                if (st != SQ_OK) {
#pragma omp atomic write
                    status = st;
                    continue;
                }
                const float *v = in->round_v ? in->round_v + i * cols : NULL;
                if (v && !sq_all_finite(v + c0, cq - c0)) {
#pragma omp atomic write
                    status = SQ_ERR_NONFINITE_ROUND_V;
                    continue;
                }
                if (v)
                    for (int64_t c = c0; c < cq; ++c)
                        sq_store(out, p->out_dtype, i * cols + c, sq_grid_apply_offset(&g, wt[c], v[c]));
                else
                    for (int64_t c = c0; c < cq; ++c) sq_store(out, p->out_dtype, i * cols + c, sq_grid_apply(&g, wt[c]));
                for (int64_t c = cq; c < c1; ++c) sq_store(out, p->out_dtype, i * cols + c, wt[c]);
            }
        }
        free(wt);
    }
    return status;
}

int sq_wq_backward_ref(const sq_wq_params *p, const sq_wq_inputs *in, const sq_wq_grads *gr) {
    if (gr->grad_v && !in->round_v) return SQ_ERR_ARGS; /* dL/dV needs V */
    const int64_t rows = p->rows, cols = p->cols, n_groups = cols / p->group;
    const int rank = p->rank;
    const int nt = sq_threads(p->nthreads, rows);
    const int nslots = sq_slots(rows);
    /* per thread: wt row and dL/dWt row; per slot: alpha and A accumulators */
    const int64_t off_alpha = 0, off_a = cols;
    sq_scratch sc, acc;
    if (sq_scratch_init(&sc, nt, 2 * cols) != SQ_OK) return SQ_ERR_NOMEM;
    if (sq_scratch_init(&acc, nslots, cols + (int64_t)rank * cols) != SQ_OK) {
        free(sc.base);
        return SQ_ERR_NOMEM;
    }
    int status = SQ_OK;
#pragma omp parallel num_threads(nt)
    {
        float *wt = sq_scratch_thread(&sc, SQ_THREAD_ID()), *gwt = wt + cols;
#pragma omp for schedule(dynamic, 1)
        for (int slot = 0; slot < nslots; ++slot) {
        float *acc_alpha = sq_scratch_thread(&acc, slot) + off_alpha, *acc_a = sq_scratch_thread(&acc, slot) + off_a;
        for (int64_t i = sq_slot_begin(rows, slot, nslots); i < sq_slot_begin(rows, slot + 1, nslots); ++i) {
            transform_row(p, in, i, wt);
            for (int64_t j = 0; j < n_groups; ++j) {
                const int64_t c0 = j * p->group, c1 = c0 + p->group;
                const int64_t cq = c1 < p->n_quant ? c1 : (p->n_quant > c0 ? p->n_quant : c0);
                sq_grid g;
                int st = group_grid(p, in, wt + c0, i, j, n_groups, &g);
                if (st != SQ_OK) {
#pragma omp atomic write
                    status = st;
                    continue;
                }
                const float *v = in->round_v ? in->round_v + i * cols : NULL;
                float *gv = gr->grad_v ? gr->grad_v + i * cols : NULL;
                if (v && !sq_all_finite(v + c0, cq - c0)) {
#pragma omp atomic write
                    status = SQ_ERR_NONFINITE_ROUND_V;
                    continue;
                }
                float ds = 0.0f;
                for (int64_t c = c0; c < cq; ++c) {
                    const float go = sq_load(gr->grad_out, p->out_dtype, i * cols + c);
                    const float t = wt[c] / g.s;
                    /* V moves the rounding only: d(t + V)/ds does not involve V, so ds keeps -t */
                    const float xi = nearbyintf(v ? t + v[c] : t) + g.z;
                    const int inside = xi >= g.qmin && xi <= g.qmax;
                    const float q = fminf(fmaxf(xi, g.qmin), g.qmax);
                    gwt[c] = inside ? go : 0.0f;
                    if (gv) gv[c] = inside ? go * g.s : 0.0f;
                    ds += go * ((q - g.z) - (inside ? t : 0.0f));
                }
                for (int64_t c = cq; c < c1; ++c) gwt[c] = sq_load(gr->grad_out, p->out_dtype, i * cols + c);
                if (gv)
                    for (int64_t c = cq; c < c1; ++c) gv[c] = 0.0f;
                float du = 0.0f, dl = 0.0f;
                if (cq > c0) {
                    float dmx, dmn;
                    sq_grid_backward(&g, p->symmetric, in->lwc_u != NULL, in->lwc_l != NULL, ds, &du, &dl,
                                     &dmx, &dmn);
                    int64_t n_mx = 0, n_mn = 0;
                    for (int64_t c = c0; c < c1; ++c) {
                        n_mx += wt[c] == g.mx;
                        n_mn += wt[c] == g.mn;
                    }
                    /* amax / amin share their gradient evenly between tied extremes */
                    const float share_mx = dmx / (float)n_mx, share_mn = dmn / (float)n_mn;
                    for (int64_t c = c0; c < c1; ++c) {
                        if (wt[c] == g.mx) gwt[c] += share_mx;
                        if (wt[c] == g.mn) gwt[c] += share_mn;
                    }
                }
                if (gr->grad_u) gr->grad_u[i * n_groups + j] = du;
                if (gr->grad_l) gr->grad_l[i * n_groups + j] = dl;
            }
            if (gr->grad_wt) memcpy(gr->grad_wt + i * cols, gwt, (size_t)cols * sizeof(float));
            if (gr->grad_alpha)
                for (int64_t c = 0; c < cols; ++c) acc_alpha[c] += gwt[c] * sq_load(in->w, p->dtype, i * cols + c);
            if (rank) {
                for (int k = 0; k < rank; ++k) {
                    const float *a_k = in->lora_a + (int64_t)k * cols;
                    const float b_ik = in->lora_b[i * rank + k];
                    float dot = 0.0f;
                    for (int64_t c = 0; c < cols; ++c) dot += gwt[c] * a_k[c];
                    if (gr->grad_b) gr->grad_b[i * rank + k] = p->lora_scaling * dot;
                    if (gr->grad_a) {
                        float *acc = acc_a + (int64_t)k * cols;
                        const float coef = p->lora_scaling * b_ik;
                        for (int64_t c = 0; c < cols; ++c) acc[c] += coef * gwt[c];
                    }
                }
            }
        }
        }
    }
    if (status == SQ_OK) {
        if (gr->grad_alpha) sq_scratch_reduce(&acc, nslots, off_alpha, cols, gr->grad_alpha);
        if (rank && gr->grad_a) sq_scratch_reduce(&acc, nslots, off_a, (int64_t)rank * cols, gr->grad_a);
    }
    free(sc.base);
    free(acc.base);
    return status;
}
