/*
 * sq_avx2.h: AVX2/FMA building blocks shared by the *_avx2.c kernels.
 *
 * Include only from files compiled for AVX2 (they start with `#pragma GCC target("avx2,fma")`);
 * the dispatch table calls them only after __builtin_cpu_supports says the CPU has both.
 * Each span helper handles its own scalar tail, with the same per-element arithmetic as the
 * reference (IEEE division, round-half-to-even), so spans agree with *_ref.c bit for bit.
 */
#ifndef SQ_AVX2_H
#define SQ_AVX2_H

#include <immintrin.h>

#include "sq_common.h"

#define SQ_ROUND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

/* Outputs larger than this are written with non-temporal stores: they cannot stay in cache
 * anyway, and streaming saves the read-for-ownership of every destination line. */
#define SQ_STREAM_BYTES (8 << 20)

static inline int sq_stream_worth_it(int64_t rows, int64_t cols, sq_dtype dt) {
    return rows * cols * (dt == SQ_F32 ? 4 : 2) > SQ_STREAM_BYTES;
}

static inline __m256 sq_load8(const void *p, sq_dtype dt, int64_t idx) {
    if (dt == SQ_F32) return _mm256_loadu_ps((const float *)p + idx);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + idx));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Round-to-nearest-even bf16 bits of 8 finite floats, one per 32-bit lane (low 16 bits). */
static inline __m256i sq_bf16_bits8(__m256i u) {
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
}

static inline __m128i sq_pack8_u16(__m256i r) {
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* 8 floats -> 8 bfloat16, round to nearest even, NaN kept quiet (as sq_f32_to_bf16) */
static inline __m128i sq_cvt8_bf16(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i isnan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                             _mm256_set1_epi32(0x7f800000));
    const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return sq_pack8_u16(_mm256_blendv_epi8(sq_bf16_bits8(u), qnan, isnan));
}

/* The same for values known to be finite (no NaN to keep quiet): five instructions fewer. */
static inline __m128i sq_cvt8_bf16_finite(__m256 v) { return sq_pack8_u16(sq_bf16_bits8(_mm256_castps_si256(v))); }

/* Store 8 finite floats as dt (the quantized weight spans: a non-finite group is an error, never stored). */
static inline void sq_store8_finite(void *p, sq_dtype dt, int64_t idx, __m256 v, int stream) {
    if (dt == SQ_F32) {
        if (stream)
            _mm256_stream_ps((float *)p + idx, v);
        else
            _mm256_storeu_ps((float *)p + idx, v);
    } else {
        const __m128i h = sq_cvt8_bf16_finite(v);
        if (stream)
            _mm_stream_si128((__m128i *)((uint16_t *)p + idx), h);
        else
            _mm_storeu_si128((__m128i *)((uint16_t *)p + idx), h);
    }
}

static inline void sq_store8(void *p, sq_dtype dt, int64_t idx, __m256 v) {
    if (dt == SQ_F32)
        _mm256_storeu_ps((float *)p + idx, v);
    else
        _mm_storeu_si128((__m128i *)((uint16_t *)p + idx), sq_cvt8_bf16(v));
}

/* Whether a span starting at out[idx] can be streamed. */
static inline int sq_can_stream(const void *p, sq_dtype dt, int64_t idx, int stream) {
    const uintptr_t addr = (uintptr_t)p + (uintptr_t)idx * (dt == SQ_F32 ? 4u : 2u);
    return stream && (addr & (dt == SQ_F32 ? 31u : 15u)) == 0;
}

static inline float sq_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline float sq_hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline float sq_hmin8(__m256 v) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    s = _mm_min_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* max, min and finiteness of x[0..n) (n >= 1). NaN is caught by the unordered compare; an Inf
 * ends up as the max or min, which sq_grid_make rejects. */
static inline int sq_minmax_avx2(const float *x, int64_t n, float *mx_out, float *mn_out) {
    __m256 vmx = _mm256_set1_ps(x[0]), vmn = vmx, bad = _mm256_setzero_ps();
    __m256 vmx2 = vmx, vmn2 = vmn, bad2 = bad; /* two chains: max/min latency, not throughput, bound one */
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
        const __m256 v = _mm256_loadu_ps(x + c), v2 = _mm256_loadu_ps(x + c + 8);
        vmx = _mm256_max_ps(vmx, v);
        vmn = _mm256_min_ps(vmn, v);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vmx2 = _mm256_max_ps(vmx2, v2);
        vmn2 = _mm256_min_ps(vmn2, v2);
        bad2 = _mm256_or_ps(bad2, _mm256_cmp_ps(v2, v2, _CMP_UNORD_Q));
    }
    /* NaN never reaches the max/min (caught by `bad`), so merging the chains is order-free */
    vmx = _mm256_max_ps(vmx, vmx2);
    vmn = _mm256_min_ps(vmn, vmn2);
    bad = _mm256_or_ps(bad, bad2);
    for (; c + 8 <= n; c += 8) {
        const __m256 v = _mm256_loadu_ps(x + c);
        vmx = _mm256_max_ps(vmx, v);
        vmn = _mm256_min_ps(vmn, v);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float mx = sq_hmax8(vmx), mn = sq_hmin8(vmn);
    int finite = _mm256_movemask_ps(bad) == 0;
    for (; c < n; ++c) {
        finite &= !isnan(x[c]);
        mx = fmaxf(mx, x[c]);
        mn = fminf(mn, x[c]);
    }
    *mx_out = mx;
    *mn_out = mn;
    return finite;
}

/* out[idx + c] = dequant(quant(x[c])) for c < n, stored as dt */
static inline void sq_quant_span_avx2(const sq_grid *g, const float *x, int64_t n, void *out, sq_dtype dt,
                                      int64_t idx, int stream) {
    stream = sq_can_stream(out, dt, idx, stream);
    const __m256 vs = _mm256_set1_ps(g->s), vz = _mm256_set1_ps(g->z);
    const __m256 lo = _mm256_set1_ps(g->qmin), hi = _mm256_set1_ps(g->qmax);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 q = _mm256_add_ps(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + c), vs), SQ_ROUND), vz);
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        sq_store8_finite(out, dt, idx + c, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs), stream);
    }
    for (; c < n; ++c) sq_store(out, dt, idx + c, sq_grid_apply(g, x[c]));
}

/* The same with a rounding offset: out[idx + c] = dequant(clamp(round(x[c] / s + v[c]) + z)) */
static inline void sq_quant_offset_span_avx2(const sq_grid *g, const float *x, const float *v, int64_t n, void *out,
                                             sq_dtype dt, int64_t idx, int stream) {
    stream = sq_can_stream(out, dt, idx, stream);
    const __m256 vs = _mm256_set1_ps(g->s), vz = _mm256_set1_ps(g->z);
    const __m256 lo = _mm256_set1_ps(g->qmin), hi = _mm256_set1_ps(g->qmax);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256 t = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(x + c), vs), _mm256_loadu_ps(v + c));
        __m256 q = _mm256_add_ps(_mm256_round_ps(t, SQ_ROUND), vz);
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        sq_store8_finite(out, dt, idx + c, _mm256_mul_ps(_mm256_sub_ps(q, vz), vs), stream);
    }
    for (; c < n; ++c) sq_store(out, dt, idx + c, sq_grid_apply_offset(g, x[c], v[c]));
}

/* Whether x[0..n) holds no NaN and no Inf. */
static inline int sq_finite_span_avx2(const float *x, int64_t n) {
    const __m256 inf = _mm256_set1_ps(INFINITY), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 bad = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) /* |x| < inf is false for NaN and +-Inf */
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + c), absmask), inf, _CMP_NLT_UQ));
    int finite = _mm256_movemask_ps(bad) == 0;
    for (; c < n; ++c) finite &= isfinite(x[c]) != 0;
    return finite;
}

/* out[idx + c] = x[c] for c < n, stored as dt (x finite: checked by the group's min/max pass) */
static inline void sq_copy_span_avx2(const float *x, int64_t n, void *out, sq_dtype dt, int64_t idx, int stream) {
    stream = sq_can_stream(out, dt, idx, stream);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) sq_store8_finite(out, dt, idx + c, _mm256_loadu_ps(x + c), stream);
    for (; c < n; ++c) sq_store(out, dt, idx + c, x[c]);
}

/* Backward through the grid on a quantized span: writes dL/dx (straight-through, zero outside
 * the clamp range) and returns the span's contribution to dL/ds. */
static inline float sq_quant_span_backward_avx2(const sq_grid *g, const float *x, int64_t n,
                                                const void *grad, sq_dtype dt, int64_t idx, float *gx) {
    const __m256 vs = _mm256_set1_ps(g->s), vz = _mm256_set1_ps(g->z);
    const __m256 lo = _mm256_set1_ps(g->qmin), hi = _mm256_set1_ps(g->qmax);
    __m256 vds[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}; /* two chains of the dL/ds sum */
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256 go = sq_load8(grad, dt, idx + c);
        const __m256 t = _mm256_div_ps(_mm256_loadu_ps(x + c), vs);
        const __m256 xi = _mm256_add_ps(_mm256_round_ps(t, SQ_ROUND), vz);
        const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(xi, lo, _CMP_GE_OQ), _mm256_cmp_ps(xi, hi, _CMP_LE_OQ));
        const __m256 q = _mm256_min_ps(_mm256_max_ps(xi, lo), hi);
        _mm256_storeu_ps(gx + c, _mm256_and_ps(inside, go));
        const int h = (int)(c >> 3) & 1;
        vds[h] = _mm256_fmadd_ps(go, _mm256_sub_ps(_mm256_sub_ps(q, vz), _mm256_and_ps(inside, t)), vds[h]);
    }
    float ds = sq_hsum8(_mm256_add_ps(vds[0], vds[1]));
    for (; c < n; ++c) {
        const float go = sq_load(grad, dt, idx + c);
        const float t = x[c] / g->s;
        const float xi = nearbyintf(t) + g->z;
        const int inside = xi >= g->qmin && xi <= g->qmax;
        const float q = fminf(fmaxf(xi, g->qmin), g->qmax);
        gx[c] = inside ? go : 0.0f;
        ds += go * ((q - g->z) - (inside ? t : 0.0f));
    }
    return ds;
}

/* The same with a rounding offset v: the code is clamp(round(x / s + v) + z); dL/dx and dL/ds are
 * unchanged in form, and gv[c] = inside ? go * s : 0 (gv may be NULL: not wanted). */
static inline float sq_quant_offset_span_backward_avx2(const sq_grid *g, const float *x, const float *v, int64_t n,
                                                       const void *grad, sq_dtype dt, int64_t idx, float *gx,
                                                       float *gv) {
    const __m256 vs = _mm256_set1_ps(g->s), vz = _mm256_set1_ps(g->z);
    const __m256 lo = _mm256_set1_ps(g->qmin), hi = _mm256_set1_ps(g->qmax);
    __m256 vds[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256 go = sq_load8(grad, dt, idx + c);
        const __m256 t = _mm256_div_ps(_mm256_loadu_ps(x + c), vs);
        const __m256 xi = _mm256_add_ps(_mm256_round_ps(_mm256_add_ps(t, _mm256_loadu_ps(v + c)), SQ_ROUND), vz);
        const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(xi, lo, _CMP_GE_OQ), _mm256_cmp_ps(xi, hi, _CMP_LE_OQ));
        const __m256 q = _mm256_min_ps(_mm256_max_ps(xi, lo), hi);
        _mm256_storeu_ps(gx + c, _mm256_and_ps(inside, go));
        if (gv) _mm256_storeu_ps(gv + c, _mm256_and_ps(inside, _mm256_mul_ps(go, vs)));
        const int h = (int)(c >> 3) & 1;
        vds[h] = _mm256_fmadd_ps(go, _mm256_sub_ps(_mm256_sub_ps(q, vz), _mm256_and_ps(inside, t)), vds[h]);
    }
    float ds = sq_hsum8(_mm256_add_ps(vds[0], vds[1]));
    for (; c < n; ++c) {
        const float go = sq_load(grad, dt, idx + c);
        const float t = x[c] / g->s;
        const float xi = nearbyintf(t + v[c]) + g->z;
        const int inside = xi >= g->qmin && xi <= g->qmax;
        const float q = fminf(fmaxf(xi, g->qmin), g->qmax);
        gx[c] = inside ? go : 0.0f;
        if (gv) gv[c] = inside ? go * g->s : 0.0f;
        ds += go * ((q - g->z) - (inside ? t : 0.0f));
    }
    return ds;
}

/* gx[c] = grad[idx + c] as float32 */
static inline void sq_load_span_avx2(const void *grad, sq_dtype dt, int64_t idx, int64_t n, float *gx) {
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(gx + c, sq_load8(grad, dt, idx + c));
    for (; c < n; ++c) gx[c] = sq_load(grad, dt, idx + c);
}

/* The min/max of a span receive dmx / dmn, shared evenly between tied extremes (as amax/amin).
 * Extremes are rare, so one pass counts them and remembers the 8-wide blocks that hold one;
 * only those blocks are revisited (a full second pass if there are too many). */
static inline void sq_extremes_backward_avx2(const float *x, int64_t n, float mx, float mn, float dmx,
                                             float dmn, float *gx) {
    enum { MAX_HITS = 64 };
    int64_t hits[MAX_HITS];
    int n_hits = 0, overflow = 0;
    const __m256 vmx = _mm256_set1_ps(mx), vmn = _mm256_set1_ps(mn);
    int64_t n_mx = 0, n_mn = 0, c = 0;
    for (; c + 8 <= n; c += 8) {
        const __m256 v = _mm256_loadu_ps(x + c);
        const int m_mx = _mm256_movemask_ps(_mm256_cmp_ps(v, vmx, _CMP_EQ_OQ));
        const int m_mn = _mm256_movemask_ps(_mm256_cmp_ps(v, vmn, _CMP_EQ_OQ));
        if (m_mx | m_mn) {
            n_mx += __builtin_popcount((unsigned)m_mx);
            n_mn += __builtin_popcount((unsigned)m_mn);
            if (n_hits < MAX_HITS)
                hits[n_hits++] = c;
            else
                overflow = 1;
        }
    }
    const int64_t tail = c;
    for (; c < n; ++c) {
        n_mx += x[c] == mx;
        n_mn += x[c] == mn;
    }
    const float share_mx = dmx / (float)n_mx, share_mn = dmn / (float)n_mn;
    if (overflow) { /* many ties (e.g. a constant group): revisit everything */
        for (c = 0; c < tail; ++c) {
            if (x[c] == mx) gx[c] += share_mx;
            if (x[c] == mn) gx[c] += share_mn;
        }
        n_hits = 0;
    }
    for (int h = 0; h < n_hits; ++h)
        for (int64_t e = hits[h]; e < hits[h] + 8; ++e) {
            if (x[e] == mx) gx[e] += share_mx;
            if (x[e] == mn) gx[e] += share_mn;
        }
    for (c = tail; c < n; ++c) {
        if (x[c] == mx) gx[c] += share_mx;
        if (x[c] == mn) gx[c] += share_mn;
    }
}

#endif /* SQ_AVX2_H */
