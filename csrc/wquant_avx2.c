/*
 * wquant_avx2.c: AVX2/FMA twin of wquant_ref.c (same signatures, _avx2 suffix).
 * One pass per row builds W * alpha + s B A into a per-thread row buffer (L1/L2 resident),
 * then each group is reduced and quantized from that buffer.
 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#include "sq_avx2.h"

static void transform_row_avx2(const sq_wq_params *p, const sq_wq_inputs *in, int64_t i, float *wt) {
    const int64_t cols = p->cols, base = i * cols;
    const int rank = p->rank;
    const float *b_row = rank ? in->lora_b + i * rank : NULL;
    __m256 vb[SQ_MAX_RANK];
    for (int k = 0; k < rank; ++k) vb[k] = _mm256_set1_ps(b_row[k]);
    const __m256 vsc = _mm256_set1_ps(p->lora_scaling);
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
        __m256 v = sq_load8(in->w, p->dtype, base + c);
        if (in->alpha) v = _mm256_mul_ps(v, _mm256_loadu_ps(in->alpha + c));
        if (rank) {
            __m256 acc = _mm256_mul_ps(vb[0], _mm256_loadu_ps(in->lora_a + c));
            for (int k = 1; k < rank; ++k) acc = _mm256_fmadd_ps(vb[k], _mm256_loadu_ps(in->lora_a + (int64_t)k * cols + c), acc);
            v = _mm256_fmadd_ps(vsc, acc, v);
        }
        _mm256_storeu_ps(wt + c, v);
    }
    for (; c < cols; ++c) {
        float v = sq_load(in->w, p->dtype, base + c);
        if (in->alpha) v *= in->alpha[c];
        if (rank) {
            float acc = b_row[0] * in->lora_a[c];
            for (int k = 1; k < rank; ++k) acc = fmaf(b_row[k], in->lora_a[(int64_t)k * cols + c], acc);
            v = fmaf(p->lora_scaling, acc, v);
        }
        wt[c] = v;
    }
}

static int group_grid_avx2(const sq_wq_params *p, const sq_wq_inputs *in, const float *x, int64_t i,
                           int64_t j, int64_t n_groups, sq_grid *g) {
    float mx, mn;
    if (!sq_minmax_avx2(x, p->group, &mx, &mn)) return SQ_ERR_NONFINITE_INPUT;
    return sq_grid_make_lwc(mx, mn, in->lwc_u ? in->lwc_u + i * n_groups + j : NULL,
                            in->lwc_l ? in->lwc_l + i * n_groups + j : NULL, p->lwc_linear, p->bits, p->symmetric, g);
}

int sq_wq_forward_avx2(const sq_wq_params *p, const sq_wq_inputs *in, void *out) {
    const int64_t rows = p->rows, cols = p->cols, n_groups = cols / p->group;
    const int stream = sq_stream_worth_it(rows, cols, p->out_dtype);
    const int nt = sq_threads(p->nthreads, rows);
    sq_scratch sc;
    if (sq_scratch_init(&sc, nt, cols) != SQ_OK) return SQ_ERR_NOMEM;
    int status = SQ_OK;
#pragma omp parallel num_threads(nt)
    {
        float *wt = sq_scratch_thread(&sc, SQ_THREAD_ID());
#pragma omp for schedule(dynamic, SQ_ROW_CHUNK)
        for (int64_t i = 0; i < rows; ++i) {
            transform_row_avx2(p, in, i, wt);
            for (int64_t j = 0; j < n_groups; ++j) {
                const int64_t c0 = j * p->group, c1 = c0 + p->group;
                const int64_t cq = c1 < p->n_quant ? c1 : (p->n_quant > c0 ? p->n_quant : c0);
                sq_grid g;
                int st = group_grid_avx2(p, in, wt + c0, i, j, n_groups, &g);
                if (st != SQ_OK) {
#pragma omp atomic write
                    status = st;
                    continue;
                }
                const float *v = in->round_v ? in->round_v + i * cols : NULL;
                if (v && !sq_finite_span_avx2(v + c0, cq - c0)) {
#pragma omp atomic write
                    status = SQ_ERR_NONFINITE_ROUND_V;
                    continue;
                }
                if (v)
                    sq_quant_offset_span_avx2(&g, wt + c0, v + c0, cq - c0, out, p->out_dtype, i * cols + c0, stream);
                else
                    sq_quant_span_avx2(&g, wt + c0, cq - c0, out, p->out_dtype, i * cols + c0, stream);
                sq_copy_span_avx2(wt + cq, c1 - cq, out, p->out_dtype, i * cols + cq, stream);
            }
        }
        _mm_sfence();
    }
    free(sc.base);
    return status;
}

/* acc_alpha[c] += gwt[c] * W[i, c] */
static void accumulate_alpha_avx2(const sq_wq_params *p, const sq_wq_inputs *in, int64_t i, const float *gwt,
                                  float *acc) {
    const int64_t cols = p->cols, base = i * cols;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
        const __m256 w = sq_load8(in->w, p->dtype, base + c);
        _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(_mm256_loadu_ps(gwt + c), w, _mm256_loadu_ps(acc + c)));
    }
    for (; c < cols; ++c) acc[c] = fmaf(gwt[c], sq_load(in->w, p->dtype, base + c), acc[c]);
}

/* dB[i, k] = s * <gwt, A[k]> for every k: one k at a time, four independent accumulators over
 * the columns (a single chain would wait on the FMA latency at every step). */
static void lora_grad_b_avx2(const sq_wq_params *p, const sq_wq_inputs *in, const sq_wq_grads *gr, int64_t i,
                             const float *gwt) {
    const int64_t cols = p->cols;
    for (int k = 0; k < p->rank; ++k) {
        const float *a_k = in->lora_a + (int64_t)k * cols;
        __m256 v0 = _mm256_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
        int64_t c = 0;
        for (; c + 32 <= cols; c += 32) {
            v0 = _mm256_fmadd_ps(_mm256_loadu_ps(gwt + c), _mm256_loadu_ps(a_k + c), v0);
            v1 = _mm256_fmadd_ps(_mm256_loadu_ps(gwt + c + 8), _mm256_loadu_ps(a_k + c + 8), v1);
            v2 = _mm256_fmadd_ps(_mm256_loadu_ps(gwt + c + 16), _mm256_loadu_ps(a_k + c + 16), v2);
            v3 = _mm256_fmadd_ps(_mm256_loadu_ps(gwt + c + 24), _mm256_loadu_ps(a_k + c + 24), v3);
        }
        for (; c + 8 <= cols; c += 8) v0 = _mm256_fmadd_ps(_mm256_loadu_ps(gwt + c), _mm256_loadu_ps(a_k + c), v0);
        float dot = sq_hsum8(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
        for (; c < cols; ++c) dot = fmaf(gwt[c], a_k[c], dot);
        gr->grad_b[i * p->rank + k] = p->lora_scaling * dot;
    }
}

/* Rows of dL/dWt buffered before they are folded into the dA accumulator: each accumulator
 * vector is loaded and stored once per block instead of once per row. */
#define SQ_LORA_BLOCK 8

/* acc_a[k] += coef[r][k] * gwt[r] for the nb buffered rows r, in row order (the same sequence of
 * fused multiply-adds per element as one row at a time, so results do not depend on the block). */
static void lora_flush_a_avx2(const sq_wq_params *p, const float *blk, const float *coef, int nb, float *acc_a) {
    const int64_t cols = p->cols;
    const int rank = p->rank;
    for (int k = 0; k < rank; ++k) {
        float *acc = acc_a + (int64_t)k * cols;
        __m256 vc[SQ_LORA_BLOCK];
        for (int r = 0; r < nb; ++r) vc[r] = _mm256_set1_ps(coef[r * rank + k]);
        int64_t c = 0;
        for (; c + 32 <= cols; c += 32) { /* four columns chunks: four independent chains over the rows */
            __m256 v0 = _mm256_loadu_ps(acc + c), v1 = _mm256_loadu_ps(acc + c + 8);
            __m256 v2 = _mm256_loadu_ps(acc + c + 16), v3 = _mm256_loadu_ps(acc + c + 24);
            for (int r = 0; r < nb; ++r) {
                const float *g = blk + (int64_t)r * cols + c;
                v0 = _mm256_fmadd_ps(vc[r], _mm256_loadu_ps(g), v0);
                v1 = _mm256_fmadd_ps(vc[r], _mm256_loadu_ps(g + 8), v1);
                v2 = _mm256_fmadd_ps(vc[r], _mm256_loadu_ps(g + 16), v2);
                v3 = _mm256_fmadd_ps(vc[r], _mm256_loadu_ps(g + 24), v3);
            }
            _mm256_storeu_ps(acc + c, v0);
            _mm256_storeu_ps(acc + c + 8, v1);
            _mm256_storeu_ps(acc + c + 16, v2);
            _mm256_storeu_ps(acc + c + 24, v3);
        }
        for (; c + 8 <= cols; c += 8) {
            __m256 v = _mm256_loadu_ps(acc + c);
            for (int r = 0; r < nb; ++r) v = _mm256_fmadd_ps(vc[r], _mm256_loadu_ps(blk + (int64_t)r * cols + c), v);
            _mm256_storeu_ps(acc + c, v);
        }
        for (; c < cols; ++c) {
            float v = acc[c];
            for (int r = 0; r < nb; ++r) v = fmaf(coef[r * rank + k], blk[(int64_t)r * cols + c], v);
            acc[c] = v;
        }
    }
}

int sq_wq_backward_avx2(const sq_wq_params *p, const sq_wq_inputs *in, const sq_wq_grads *gr) {
    if (gr->grad_v && !in->round_v) return SQ_ERR_ARGS; /* dL/dV needs V */
    const int64_t rows = p->rows, cols = p->cols, n_groups = cols / p->group;
    const int rank = p->rank;
    const int nt = sq_threads(p->nthreads, rows);
    const int nslots = sq_slots(rows);
    const int64_t off_alpha = 0, off_a = cols;
    sq_scratch sc, acc;
    /* per thread: the wt row, SQ_LORA_BLOCK rows of dL/dWt, their LoRA coefficients */
    const int64_t per_thread = (1 + SQ_LORA_BLOCK) * cols + SQ_LORA_BLOCK * (int64_t)(rank ? rank : 1);
    if (sq_scratch_init(&sc, nt, per_thread) != SQ_OK) return SQ_ERR_NOMEM;
    if (sq_scratch_init(&acc, nslots, cols + (int64_t)rank * cols) != SQ_OK) {
        free(sc.base);
        return SQ_ERR_NOMEM;
    }
    int status = SQ_OK;
#pragma omp parallel num_threads(nt)
    {
        float *wt = sq_scratch_thread(&sc, SQ_THREAD_ID()), *blk = wt + cols;
        float *coef = blk + SQ_LORA_BLOCK * cols;
#pragma omp for schedule(dynamic, 1)
        for (int slot = 0; slot < nslots; ++slot) {
        float *slot_acc = sq_scratch_thread(&acc, slot);
        const int64_t i_end = sq_slot_begin(rows, slot + 1, nslots);
        int nb = 0; /* rows of dL/dWt buffered in blk */
        for (int64_t i = sq_slot_begin(rows, slot, nslots); i < i_end; ++i) {
            float *gwt = blk + (int64_t)nb * cols;
            transform_row_avx2(p, in, i, wt);
            for (int64_t j = 0; j < n_groups; ++j) {
                const int64_t c0 = j * p->group, c1 = c0 + p->group;
                const int64_t cq = c1 < p->n_quant ? c1 : (p->n_quant > c0 ? p->n_quant : c0);
                sq_grid g;
                int st = group_grid_avx2(p, in, wt + c0, i, j, n_groups, &g);
                if (st != SQ_OK) {
#pragma omp atomic write
                    status = st;
                    continue;
                }
                const float *v = in->round_v ? in->round_v + i * cols : NULL;
                float *gv = gr->grad_v ? gr->grad_v + i * cols : NULL;
                if (v && !sq_finite_span_avx2(v + c0, cq - c0)) {
#pragma omp atomic write
                    status = SQ_ERR_NONFINITE_ROUND_V;
                    continue;
                }
                const float ds = v ? sq_quant_offset_span_backward_avx2(&g, wt + c0, v + c0, cq - c0, gr->grad_out,
                                                                        p->out_dtype, i * cols + c0, gwt + c0,
                                                                        gv ? gv + c0 : NULL)
                                   : sq_quant_span_backward_avx2(&g, wt + c0, cq - c0, gr->grad_out, p->out_dtype,
                                                                 i * cols + c0, gwt + c0);
                sq_load_span_avx2(gr->grad_out, p->out_dtype, i * cols + cq, c1 - cq, gwt + cq);
                if (gv) memset(gv + cq, 0, (size_t)(c1 - cq) * sizeof(float));
                float du = 0.0f, dl = 0.0f;
                if (cq > c0) {
                    float dmx, dmn;
                    sq_grid_backward(&g, p->symmetric, in->lwc_u != NULL, in->lwc_l != NULL, ds, &du, &dl,
                                     &dmx, &dmn);
                    sq_extremes_backward_avx2(wt + c0, p->group, g.mx, g.mn, dmx, dmn, gwt + c0);
                }
                if (gr->grad_u) gr->grad_u[i * n_groups + j] = du;
                if (gr->grad_l) gr->grad_l[i * n_groups + j] = dl;
            }
            if (gr->grad_wt) memcpy(gr->grad_wt + i * cols, gwt, (size_t)cols * sizeof(float));
            if (gr->grad_alpha) accumulate_alpha_avx2(p, in, i, gwt, slot_acc + off_alpha);
            if (rank && gr->grad_b) lora_grad_b_avx2(p, in, gr, i, gwt);
            if (rank && gr->grad_a) {
                for (int k = 0; k < rank; ++k) coef[nb * rank + k] = p->lora_scaling * in->lora_b[i * rank + k];
                if (++nb == SQ_LORA_BLOCK || i + 1 == i_end) {
                    lora_flush_a_avx2(p, blk, coef, nb, slot_acc + off_a);
                    nb = 0;
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

#endif /* x86 */
