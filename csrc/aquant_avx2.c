/*
 * aquant_avx2.c: AVX2/FMA twin of aquant_ref.c (per-token activation fake quantization).
 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#include "sq_avx2.h"

/* xt = X[i] / alpha (IEEE division, as the reference) into the row buffer */
static void load_row_avx2(const sq_aq_params *p, const void *x, const float *alpha, int64_t i, float *xt) {
    const int64_t cols = p->cols, base = i * cols;
    if (!alpha) {
        sq_load_span_avx2(x, p->dtype, base, cols, xt);
        return;
    }
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8)
        _mm256_storeu_ps(xt + c, _mm256_div_ps(sq_load8(x, p->dtype, base + c), _mm256_loadu_ps(alpha + c)));
    for (; c < cols; ++c) xt[c] = sq_load(x, p->dtype, base + c) / alpha[c];
}

static int row_grid_avx2(const sq_aq_params *p, const float *xt, sq_grid *g) {
    float mx, mn;
    if (!sq_minmax_avx2(xt, p->cols, &mx, &mn)) return SQ_ERR_NONFINITE_INPUT;
    return sq_grid_make(mx, mn, NULL, NULL, p->bits, p->symmetric, g);
}

int sq_aq_forward_avx2(const sq_aq_params *p, const void *x, const float *alpha, void *out) {
    const int64_t rows = p->rows, cols = p->cols;
    const int nt = sq_threads(p->nthreads, rows);
    const int stream = sq_stream_worth_it(rows, cols, p->dtype);
    sq_scratch sc;
    if (sq_scratch_init(&sc, nt, cols) != SQ_OK) return SQ_ERR_NOMEM;
    int status = SQ_OK;
#pragma omp parallel num_threads(nt)
    {
        float *xt = sq_scratch_thread(&sc, SQ_THREAD_ID());
#pragma omp for schedule(dynamic, SQ_ROW_CHUNK)
        for (int64_t i = 0; i < rows; ++i) {
            load_row_avx2(p, x, alpha, i, xt);
            sq_grid g;
            int st = row_grid_avx2(p, xt, &g);
            if (st != SQ_OK) {
#pragma omp atomic write
                status = st;
                continue;
            }
            sq_quant_span_avx2(&g, xt, p->n_quant, out, p->dtype, i * cols, stream);
            sq_copy_span_avx2(xt + p->n_quant, cols - p->n_quant, out, p->dtype, i * cols + p->n_quant, stream);
        }
        _mm_sfence();
    }
    free(sc.base);
    return status;
}

int sq_aq_backward_avx2(const sq_aq_params *p, const void *x, const float *alpha, const void *grad_out,
                        void *grad_x, float *grad_alpha) {
    const int64_t rows = p->rows, cols = p->cols;
    const int nt = sq_threads(p->nthreads, rows);
    const int stream = sq_stream_worth_it(rows, cols, p->dtype);
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
            const int64_t base = i * cols;
            load_row_avx2(p, x, alpha, i, xt);
            sq_grid g;
            int st = row_grid_avx2(p, xt, &g);
            if (st != SQ_OK) {
#pragma omp atomic write
                status = st;
                continue;
            }
            const float ds = sq_quant_span_backward_avx2(&g, xt, p->n_quant, grad_out, p->dtype, base, gxt);
            sq_load_span_avx2(grad_out, p->dtype, base + p->n_quant, cols - p->n_quant, gxt + p->n_quant);
            if (p->n_quant > 0) {
                float du, dl, dmx, dmn;
                sq_grid_backward(&g, p->symmetric, 0, 0, ds, &du, &dl, &dmx, &dmn);
                sq_extremes_backward_avx2(xt, cols, g.mx, g.mn, dmx, dmn, gxt);
            }
            int64_t c = 0;
            if (alpha) {
                for (; c + 8 <= cols; c += 8) {
                    const __m256 gv = _mm256_loadu_ps(gxt + c), av = _mm256_loadu_ps(alpha + c);
                    if (grad_x) sq_store8(grad_x, p->dtype, base + c, _mm256_div_ps(gv, av));
                    if (grad_alpha) {
                        const __m256 xv = sq_load8(x, p->dtype, base + c);
                        const __m256 num = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), xv);
                        _mm256_storeu_ps(acc_alpha + c, _mm256_add_ps(_mm256_loadu_ps(acc_alpha + c),
                                                                      _mm256_div_ps(num, _mm256_mul_ps(av, av))));
                    }
                }
                for (; c < cols; ++c) {
                    if (grad_x) sq_store(grad_x, p->dtype, base + c, gxt[c] / alpha[c]);
                    if (grad_alpha)
                        acc_alpha[c] += (-gxt[c] * sq_load(x, p->dtype, base + c)) / (alpha[c] * alpha[c]);
                }
            } else if (grad_x) {
                sq_copy_span_avx2(gxt, cols, grad_x, p->dtype, base, stream);
            }
        }
        }
        _mm_sfence();
    }
    if (status == SQ_OK && grad_alpha) sq_scratch_reduce(&acc, nslots, 0, cols, grad_alpha);
    free(sc.base);
    free(acc.base);
    return status;
}

#endif /* x86 */
