/*
 * dense_avx512.c: sq_dn_matmul_ref with AVX-512F: a zmm holds a row's 16 lane sums; 16 bf16
 * weights widen to fp32 by a zero-extension and a 16-bit shift (exact) and feed one FMA; four rows
 * at a time keep four independent chains in flight; the last partial round of columns is a masked
 * FMA (lanes past the end keep their sums); software prefetch two row steps ahead.  The lanes are then summed in the header's tree.
 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx2,fma")
#include <immintrin.h>

#include "sq_common.h"
#include "sq_dense.h"

#define SQ_INLINE static inline __attribute__((always_inline))
#define RB SQ_DN_RB
/* software prefetch SQ_DN_PF_STEPS (sq_dense.h) row steps ahead, one line per row every 32 columns;
 * on the SmolLM2 head (49152 x 576, 2 threads) 1, 2 and 4 steps gave 2.55-2.91, 2.50-2.58 and
 * 2.78-2.96 ms against 3.90-4.10 ms without (torch's bf16 F.linear: 4.4-4.6 ms) */

SQ_INLINE __m512 widen16(const uint16_t *w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16));
}

/* the tree of sq_dense.h on one zmm */
SQ_INLINE float reduce16(__m512 a) {
    const __m256 lo = _mm512_castps512_ps256(a);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    const __m256 s8 = _mm256_add_ps(lo, hi);                                                /* l + (l + 8) */
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1)); /* l + (l + 4) */
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                /* l + (l + 2) */
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

/* nr (1..RB) rows from wr (stride K) against one token's x */
static void rows_dot(const uint16_t *wr, int64_t K, int nr, const float *xt, float *out, int pf) {
    __m512 acc[RB];
    for (int i = 0; i < RB; ++i) acc[i] = _mm512_setzero_ps();
    const int64_t K16 = K / SQ_DN_LANES * SQ_DN_LANES;
    for (int64_t k = 0; k < K16; k += SQ_DN_LANES) {
        const __m512 xv = _mm512_loadu_ps(xt + k);
        if (pf && (k & 31) == 0)
            for (int i = 0; i < RB; ++i) _mm_prefetch((const char *)(wr + (SQ_DN_PF_STEPS * RB + i) * K + k), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int i = 0; i < RB; ++i)
            if (i < nr) acc[i] = _mm512_fmadd_ps(widen16(wr + i * K + k), xv, acc[i]);
    }
    if (K16 < K) {
        const int rest = (int)(K - K16);
        const __mmask16 m = (__mmask16)((1u << rest) - 1u);
        const __m512 xv = _mm512_maskz_loadu_ps(m, xt + K16);
        for (int i = 0; i < nr; ++i) {
            uint16_t tail[SQ_DN_LANES] = {0};
            memcpy(tail, wr + i * K + K16, (size_t)rest * sizeof(uint16_t));
            acc[i] = _mm512_mask3_fmadd_ps(widen16(tail), xv, acc[i], m);
        }
    }
    for (int i = 0; i < nr; ++i) out[i] = reduce16(acc[i]);
}

int sq_dn_matmul_avx512(const sq_dn_params *p, const uint16_t *w, const void *x, void *y) {
    return sq_dn_run(p, w, x, y, rows_dot);
}
#endif
