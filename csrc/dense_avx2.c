/*
 * dense_avx2.c: sq_dn_matmul_ref with AVX2 + FMA: two ymm hold a row's 16 lane sums (lanes 0-7 and
 * 8-15); 8 bf16 weights widen to fp32 by a zero-extension and a 16-bit shift (exact) per FMA; four
 * rows at a time; the last partial round of columns runs lane by lane as in the reference.  The
 * lanes are then summed in the header's tree.
 */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "sq_common.h"
#include "sq_dense.h"

#define SQ_INLINE static inline __attribute__((always_inline))
#define RB SQ_DN_RB

SQ_INLINE __m256 widen8(const uint16_t *w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}

/* nr (1..RB) rows from wr (stride K) against one token's x */
static void rows_dot(const uint16_t *wr, int64_t K, int nr, const float *xt, float *out, int pf) {
    __m256 lo[RB], hi[RB];
    for (int i = 0; i < RB; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
    const int64_t K16 = K / SQ_DN_LANES * SQ_DN_LANES;
    for (int64_t k = 0; k < K16; k += SQ_DN_LANES) {
        const __m256 x0 = _mm256_loadu_ps(xt + k), x1 = _mm256_loadu_ps(xt + k + 8);
        if (pf && (k & 31) == 0)
            for (int i = 0; i < RB; ++i) _mm_prefetch((const char *)(wr + (SQ_DN_PF_STEPS * RB + i) * K + k), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int i = 0; i < RB; ++i)
            if (i < nr) {
                lo[i] = _mm256_fmadd_ps(widen8(wr + i * K + k), x0, lo[i]);
                hi[i] = _mm256_fmadd_ps(widen8(wr + i * K + k + 8), x1, hi[i]);
            }
    }
    for (int i = 0; i < nr; ++i) {
        float a[SQ_DN_LANES];
        _mm256_storeu_ps(a, lo[i]);
        _mm256_storeu_ps(a + 8, hi[i]);
        for (int64_t k = K16; k < K; ++k)
            a[k - K16] = fmaf(sq_bf16_to_f32(wr[i * K + k]), xt[k], a[k - K16]);
        out[i] = sq_dn_reduce(a);
    }
}

int sq_dn_matmul_avx2(const sq_dn_params *p, const uint16_t *w, const void *x, void *y) {
    return sq_dn_run(p, w, x, y, rows_dot);
}
#endif
