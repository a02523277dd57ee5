/*
 * sq_common.h: scalar pieces shared by the reference and the SIMD kernels.
 *
 * The per-element loops differ between *_ref.c and *_avx2.c; the per-group math (clipping range,
 * scale, zero point and their backward) is the same scalar code for both, so the two can only
 * differ by floating-point summation order inside a group.
 */
#ifndef SQ_COMMON_H
#define SQ_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sq_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#define SQ_THREAD_ID() omp_get_thread_num()
#else
#define SQ_THREAD_ID() 0
#endif

#define SQ_ALIGN 64

static inline void *sq_alloc(size_t nbytes) {
    size_t rounded = (nbytes + SQ_ALIGN - 1) / SQ_ALIGN * SQ_ALIGN;
    return aligned_alloc(SQ_ALIGN, rounded ? rounded : SQ_ALIGN);
}

static inline int sq_threads(int requested, int64_t work_items) {
    int n = requested < 1 ? 1 : requested;
#ifndef _OPENMP
    n = 1;
#endif
    if ((int64_t)n > work_items) n = work_items < 1 ? 1 : (int)work_items;
    return n;
}

/* bfloat16 <-> float32, round to nearest even (as torch's Tensor.to(torch.bfloat16)). */
static inline float sq_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t sq_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float sq_load(const void *p, sq_dtype dt, int64_t idx) {
    return dt == SQ_F32 ? ((const float *)p)[idx] : sq_bf16_to_f32(((const uint16_t *)p)[idx]);
}

static inline void sq_store(void *p, sq_dtype dt, int64_t idx, float v) {
    if (dt == SQ_F32)
        ((float *)p)[idx] = v;
    else
        ((uint16_t *)p)[idx] = sq_f32_to_bf16(v);
}

static inline float sq_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* The quantization grid of one row or group. Symmetric grids use z = 0 and qmin = -2^(b-1),
 * so that (q - z) * s is the dequantized value in both modes. */
typedef struct {
    float mx, mn;       /* max / min of the group */
    float sig_u, sig_l; /* clipping factors (1 when no LWC) */
    int lwc_linear;     /* the LWC parameters are the factors themselves, not logits */
    float hi, lo;       /* clipped range */
    float s_raw;        /* scale before clamping */
    float s, z;         /* scale and zero point */
    float qmin, qmax;
} sq_grid;

/* lwc_linear: u and l are the clipping factors (hi = u * max); otherwise logits (hi = sigmoid(u) * max). */
static inline int sq_grid_make_lwc(float mx, float mn, const float *u, const float *l, int lwc_linear, int bits,
                                   int symmetric, sq_grid *g) {
    if (!isfinite(mx) || !isfinite(mn)) return SQ_ERR_NONFINITE_INPUT;
    g->mx = mx;
    g->mn = mn;
    g->lwc_linear = lwc_linear;
    g->sig_u = u ? (lwc_linear ? *u : sq_sigmoid(*u)) : 1.0f;
    g->sig_l = l ? (lwc_linear ? *l : sq_sigmoid(*l)) : 1.0f;
    g->hi = u ? g->sig_u * mx : mx;
    g->lo = l ? g->sig_l * mn : mn;
    /* A NaN logit makes hi or lo NaN.  Check them here: the symmetric scale takes fmaxf of the
     * two, and fmaxf returns the other operand when one is NaN, so s_raw alone would miss it. */
    if (!isfinite(g->hi) || !isfinite(g->lo)) return SQ_ERR_NONFINITE_PARAM;
    if (symmetric) {
        g->qmax = (float)((1 << (bits - 1)) - 1);
        g->qmin = -g->qmax - 1.0f;
        g->s_raw = fmaxf(fabsf(g->hi), fabsf(g->lo)) / g->qmax;
    } else {
        g->qmax = (float)((1 << bits) - 1);
        g->qmin = 0.0f;
        g->s_raw = (g->hi - g->lo) / g->qmax;
    }
    if (!isfinite(g->s_raw)) return SQ_ERR_NONFINITE_PARAM;
    g->s = fminf(fmaxf(g->s_raw, SQ_SCALE_MIN), SQ_SCALE_MAX);
    g->z = symmetric ? 0.0f : nearbyintf(-g->lo / g->s);
    return SQ_OK;
}

static inline int sq_grid_make(float mx, float mn, const float *u, const float *l, int bits, int symmetric,
                               sq_grid *g) {
    return sq_grid_make_lwc(mx, mn, u, l, 0, bits, symmetric, g);
}

static inline float sq_grid_apply(const sq_grid *g, float x) {
    float q = nearbyintf(x / g->s) + g->z;
    q = fminf(fmaxf(q, g->qmin), g->qmax);
    return (q - g->z) * g->s;
}

/* The same with a rounding offset v (in steps): round(x / s + v).  A separate function, not
 * v = 0 in sq_grid_apply: -0 + 0 is +0, so adding a zero offset can flip the sign of a zero result. */
static inline float sq_grid_apply_offset(const sq_grid *g, float x, float v) {
    float q = nearbyintf(x / g->s + v) + g->z;
    q = fminf(fmaxf(q, g->qmin), g->qmax);
    return (q - g->z) * g->s;
}

static inline int sq_all_finite(const float *x, int64_t n) {
    int finite = 1;
    for (int64_t c = 0; c < n; ++c) finite &= isfinite(x[c]) != 0;
    return finite;
}

/* Backward of the grid: dS = dL/ds summed over the quantized elements of the group.
 * Gives the gradients of the LWC logits and of the group's max and min (before tie sharing). */
static inline void sq_grid_backward(const sq_grid *g, int symmetric, int has_u, int has_l, float ds,
                                    float *du, float *dl, float *dmx, float *dmn) {
    float d_hi = 0.0f, d_lo = 0.0f;
    /* clamp passes gradient only inside [min, max] (inclusive, as torch.clamp) */
    if (g->s_raw >= SQ_SCALE_MIN && g->s_raw <= SQ_SCALE_MAX) {
        float d_raw = ds / g->qmax;
        if (symmetric) {
            float a = fabsf(g->hi), b = fabsf(g->lo);
            float sh = (g->hi > 0.0f) - (g->hi < 0.0f), sl = (g->lo > 0.0f) - (g->lo < 0.0f);
            if (a > b) {
                d_hi = d_raw * sh;
            } else if (b > a) {
                d_lo = d_raw * sl;
            } else { /* torch.maximum shares a tie evenly */
                d_hi = 0.5f * d_raw * sh;
                d_lo = 0.5f * d_raw * sl;
            }
        } else {
            d_hi = d_raw;
            d_lo = -d_raw;
        }
    }
    if (g->lwc_linear) {
        *du = has_u ? d_hi * g->mx : 0.0f;
        *dl = has_l ? d_lo * g->mn : 0.0f;
    } else {
        *du = has_u ? d_hi * g->mx * (g->sig_u * (1.0f - g->sig_u)) : 0.0f;
        *dl = has_l ? d_lo * g->mn * (g->sig_l * (1.0f - g->sig_l)) : 0.0f;
    }
    *dmx = has_u ? d_hi * g->sig_u : d_hi;
    *dmn = has_l ? d_lo * g->sig_l : d_lo;
}

/* Forward kernels hand out rows in dynamically scheduled chunks (robust when a core is busy
 * with another process).  Backward kernels split the rows into a fixed number of slots, each with
 * its own accumulators, summed in slot order afterwards: the gradients are then bitwise the same
 * whatever the thread count and the scheduling. */
#define SQ_ROW_CHUNK 8
#define SQ_SLOTS 16

static inline int sq_slots(int64_t rows) { return rows < SQ_SLOTS ? (int)rows : SQ_SLOTS; }

static inline int64_t sq_slot_begin(int64_t rows, int slot, int nslots) { return rows * slot / nslots; }

/* Zeroed scratch blocks (one per thread or per slot), reduced in block order. */
typedef struct {
    float *base;
    int64_t per_thread;
} sq_scratch;

static inline int sq_scratch_init(sq_scratch *sc, int nthreads, int64_t per_thread) {
    sc->per_thread = (per_thread + 15) / 16 * 16;
    sc->base = (float *)sq_alloc((size_t)nthreads * (size_t)sc->per_thread * sizeof(float));
    if (!sc->base) return SQ_ERR_NOMEM;
    memset(sc->base, 0, (size_t)nthreads * (size_t)sc->per_thread * sizeof(float));
    return SQ_OK;
}

static inline float *sq_scratch_thread(const sq_scratch *sc, int tid) {
    return sc->base + (int64_t)tid * sc->per_thread;
}

/* out[k] = sum over threads of acc_t[offset + k] */
static inline void sq_scratch_reduce(const sq_scratch *sc, int nthreads, int64_t offset, int64_t n,
                                     float *out) {
    for (int64_t k = 0; k < n; ++k) {
        float acc = 0.0f;
        for (int t = 0; t < nthreads; ++t) acc += sq_scratch_thread(sc, t)[offset + k];
        out[k] = acc;
    }
}

#endif /* SQ_COMMON_H */
