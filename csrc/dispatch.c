/*
 * dispatch.c: the kernel tables and the choice between them.
 * The binding layer picks one table at import (SLIDERQUANT_ISA=ref|avx2|avx512 overrides the choice;
 * the packed matmul kernels of sq_packed.h follow it, AVX-512 where the CPU has it).
 */
#include <stddef.h>

#include <string.h>

#include "sq_dense.h"
#include "sq_kernels.h"
#include "sq_packed.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
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

/* Whether the CPU multiplies bfloat16 natively (AMX-BF16 tiles or AVX512-BF16 dot products) and
 * the OS saves the AVX-512 state.  Then bf16 matmuls (oneDNN) are several times faster than fp32,
 * which is what makes bf16 autocast worth it on a CPU; without it they are emulated and slower. */
int sq_native_bf16(void) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned a, b, c, d;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid(1, a, b, c, d);
    if (!(c & (1u << 27))) return 0; /* OSXSAVE: xgetbv is usable */
    unsigned xlo, xhi;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    if ((xlo & 0xe6u) != 0xe6u) return 0; /* XMM, YMM, opmask, ZMM state enabled by the OS */
    __cpuid_count(7, 0, a, b, c, d);
    const int amx_bf16 = (d >> 22) & 1;
    const int max_sub = (int)a;
    int avx512_bf16 = 0;
    if (max_sub >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        avx512_bf16 = (a >> 5) & 1;
    }
    return amx_bf16 || avx512_bf16;
#else
    return 0;
#endif
}

/* The packed matmul kernels: "ref", "avx2", "avx512" or "auto" (the best this CPU runs). */
sq_pk_matmul_fn sq_pk_kernel(const char *isa, const char **name_out) {
    const int any = strcmp(isa, "auto") == 0;
    sq_pk_matmul_fn fn = NULL;
    const char *name = NULL;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if ((any || strcmp(isa, "avx512") == 0) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) {
        fn = sq_pk_matmul_avx512;
        name = "avx512";
    } else if ((any || strcmp(isa, "avx2") == 0) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        fn = sq_pk_matmul_avx2;
        name = "avx2";
    }
#endif
    if (!fn && (any || strcmp(isa, "ref") == 0)) {
        fn = sq_pk_matmul_ref;
        name = "ref";
    }
    if (name_out) *name_out = name;
    return fn;
}

/* The dense bf16 matmul kernels (sq_dense.h), chosen as sq_pk_kernel chooses. */
sq_dn_matmul_fn sq_dn_kernel(const char *isa, const char **name_out) {
    const int any = strcmp(isa, "auto") == 0;
    sq_dn_matmul_fn fn = NULL;
    const char *name = NULL;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if ((any || strcmp(isa, "avx512") == 0) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) {
        fn = sq_dn_matmul_avx512;
        name = "avx512";
    } else if ((any || strcmp(isa, "avx2") == 0) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        fn = sq_dn_matmul_avx2;
        name = "avx2";
    }
#endif
    if (!fn && (any || strcmp(isa, "ref") == 0)) {
        fn = sq_dn_matmul_ref;
        name = "ref";
    }
    if (name_out) *name_out = name;
    return fn;
}
