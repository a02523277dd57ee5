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
