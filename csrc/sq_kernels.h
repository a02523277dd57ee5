/*
 * sq_kernels.h: the C API of the sliderquant kernels.
 *
 * Plain C11 over raw pointers.  No Python, no torch.  Every kernel returns an sq_status.
 * The math is docs/algorithm.md section 4 and sliderquant/reference.py; *_ref.c is the source of
 * truth, *_avx2.c computes the same with AVX2/FMA (same signatures, _avx2 suffix).
 *
 * Weight fake quantization, one row i of W (rows x cols), groups of `group` columns:
 *   Wt    = W * alpha + lora_scaling * (B A)            (alpha, A, B optional)
 *   hi    = sigmoid(u[i,j]) * max(Wt group j),  lo = sigmoid(l[i,j]) * min(Wt group j)
 *           (lwc_linear: hi = u[i,j] * max, lo = l[i,j] * min; the parameters are the factors)
 *   asym:  s = clamp((hi - lo) / (2^b - 1), 1e-5, 1e4),  z = round(-lo / s)
 *          q = clamp(round(Wt / s + V) + z, 0, 2^b - 1),   W_hat = (q - z) * s
 *   sym:   s = clamp(max(|hi|, |lo|) / (2^(b-1) - 1), ...), q = clamp(round(Wt / s + V), -2^(b-1), 2^(b-1) - 1)
 *          W_hat = q * s
 * V (rows x cols, optional) is a learnable rounding offset in units of the step; without it the
 * kernels run the plain round(Wt / s), bit for bit.  Its gradient (straight-through) is
 * dL/dV = dL/dW_hat * s inside the code range, 0 where the code is clamped.
 * Only columns < n_quant are quantized; the others are Wt unchanged (and ignore V).
 * round = half to even.
 */
#ifndef SQ_KERNELS_H
#define SQ_KERNELS_H

#include <stdint.h>

typedef enum {
    SQ_OK = 0,
    SQ_ERR_NONFINITE_INPUT = 1, /* NaN or Inf in the (transformed) weight or activation */
    SQ_ERR_NONFINITE_PARAM = 2, /* the clipping logits or the scale became NaN/Inf */
    SQ_ERR_NOMEM = 3,
    SQ_ERR_ARGS = 4,
    SQ_ERR_NONFINITE_ROUND_V = 5, /* NaN or Inf in the rounding offset V (quantized columns) */
} sq_status;

typedef enum { SQ_F32 = 0, SQ_BF16 = 1 } sq_dtype;

#define SQ_MAX_RANK 64
#define SQ_SCALE_MIN 1e-5f
#define SQ_SCALE_MAX 1e4f

typedef struct {
    int64_t rows, cols;
    int64_t group;   /* columns per group; == cols for per-channel */
    int64_t n_quant; /* quantized column prefix, a multiple of group unless group == cols */
    int bits;        /* 2..8 */
    int symmetric;
    int rank;        /* LoRA rank, 0 = no LoRA */
    float lora_scaling;
    int nthreads;
    sq_dtype dtype;     /* dtype of W; parameters are always float32 */
    sq_dtype out_dtype; /* dtype of W_hat and dL/dW_hat (e.g. bf16 from an fp32 master weight under autocast) */
    int lwc_linear;     /* lwc_u / lwc_l are clipping factors, not logits */
} sq_wq_params;

/* Pointers of one weight fake-quant call.  NULL means "absent" (inputs) or "not wanted" (grads). */
typedef struct {
    const void *w;       /* rows x cols, dtype */
    const float *alpha;  /* cols */
    const float *lora_a; /* rank x cols */
    const float *lora_b; /* rows x rank */
    const float *lwc_u;  /* rows x (cols / group) */
    const float *lwc_l;  /* rows x (cols / group) */
    const float *round_v; /* rows x cols: rounding offset V */
} sq_wq_inputs;

typedef struct {
    const void *grad_out; /* rows x cols, out_dtype */
    float *grad_alpha;    /* cols */
    float *grad_a;        /* rank x cols */
    float *grad_b;        /* rows x rank */
    float *grad_u;        /* rows x groups */
    float *grad_l;        /* rows x groups */
    float *grad_wt;       /* rows x cols: dL/dWt, the gradient reaching W * alpha + s B A */
    float *grad_v;        /* rows x cols: dL/dV (0 beyond n_quant); needs round_v */
} sq_wq_grads;

typedef struct {
    int64_t rows, cols; /* tokens x channels */
    int64_t n_quant;
    int bits;
    int symmetric;
    int nthreads;
    sq_dtype dtype;
} sq_aq_params;

typedef int (*sq_wq_forward_fn)(const sq_wq_params *, const sq_wq_inputs *, void *out);
typedef int (*sq_wq_backward_fn)(const sq_wq_params *, const sq_wq_inputs *, const sq_wq_grads *);
typedef int (*sq_aq_forward_fn)(const sq_aq_params *, const void *x, const float *alpha, void *out);
typedef int (*sq_aq_backward_fn)(const sq_aq_params *, const void *x, const float *alpha,
                                 const void *grad_out, void *grad_x, float *grad_alpha);

int sq_wq_forward_ref(const sq_wq_params *, const sq_wq_inputs *, void *out);
int sq_wq_backward_ref(const sq_wq_params *, const sq_wq_inputs *, const sq_wq_grads *);
int sq_aq_forward_ref(const sq_aq_params *, const void *x, const float *alpha, void *out);
int sq_aq_backward_ref(const sq_aq_params *, const void *x, const float *alpha,
                       const void *grad_out, void *grad_x, float *grad_alpha);

int sq_wq_forward_avx2(const sq_wq_params *, const sq_wq_inputs *, void *out);
int sq_wq_backward_avx2(const sq_wq_params *, const sq_wq_inputs *, const sq_wq_grads *);
int sq_aq_forward_avx2(const sq_aq_params *, const void *x, const float *alpha, void *out);
int sq_aq_backward_avx2(const sq_aq_params *, const void *x, const float *alpha,
                        const void *grad_out, void *grad_x, float *grad_alpha);

typedef struct {
    const char *name;
    sq_wq_forward_fn wq_forward;
    sq_wq_backward_fn wq_backward;
    sq_aq_forward_fn aq_forward;
    sq_aq_backward_fn aq_backward;
} sq_kernel_table;

/* The packed low-bit matmul (y = x W^T from 2/3/4/8-bit codes) has its layout and API in
 * sq_packed.h; dispatch.c picks its kernels with sq_pk_kernel(). */

/* dispatch.c */
const sq_kernel_table *sq_kernels_ref(void);
const sq_kernel_table *sq_kernels_avx2(void); /* NULL when the CPU lacks AVX2/FMA */
const sq_kernel_table *sq_kernels_best(void);
int sq_have_openmp(void);
int sq_max_threads(void);
int sq_native_bf16(void); /* AMX-BF16 or AVX512-BF16, OS-enabled */

#endif /* SQ_KERNELS_H */
