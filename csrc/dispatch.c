/*
 * dispatch.c: the kernel tables and the choice between them.
 * The binding layer picks one table at import (SLIDERQUANT_ISA=ref|avx2 overrides the choice).
 */
#include <stddef.h>

#include "sq_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static const sq_kernel_table table_ref = {
    "ref", sq_wq_forward_ref, sq_wq_backward_ref, sq_aq_forward_ref, sq_aq_backward_ref,
};

#if defined(__x86_64__) || defined(__i386__)
static const sq_kernel_table table_avx2 = {
    "avx2", sq_wq_forward_avx2, sq_wq_backward_avx2, sq_aq_forward_avx2, sq_aq_backward_avx2,
};
#endif

const sq_kernel_table *sq_kernels_ref(void) { return &table_ref; }

const sq_kernel_table *sq_kernels_avx2(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &table_avx2;
#endif
    return NULL;
}

const sq_kernel_table *sq_kernels_best(void) {
    const sq_kernel_table *t = sq_kernels_avx2();
    return t ? t : &table_ref;
}

int sq_have_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int sq_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
