/* ------------------------------------------------------------------ packed low-bit matmul */

static int view_require_int32(const view *v) {
    SQ_DLDataType dt = v->t->dtype;
    if (dt.code == SQ_kDLInt && dt.bits == 32) return 0;
    PyErr_Format(PyExc_TypeError, "argument '%s' must be int32 (packed words), got %s", v->name, dtype_name(dt));
    return -1;
}

PyDoc_STRVAR(pk_matmul_doc,
             "pk_matmul(qweight, scale_min, x, y, rows, cols, group_size, bits, nthreads, isa)\n--\n\n"
             "y = x W^T with W packed as csrc/sq_packed.h states: qweight int32 (row_blocks, cols/32, bits, 16),\n"
             "scale_min float32 (row_blocks, cols/group_size, 2, 16); x float32 or bfloat16 (..., cols); y float32\n"
             "or bfloat16 (..., rows).  isa None uses the active kernels, else 'ref', 'avx2' or 'avx512'.");

static PyObject *pk_matmul(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 10, "pk_matmul") < 0) return NULL;
    view_set s = {0};
    PyObject *res = NULL;
    long rows, cols, group, bits, nthreads;
    if (parse_int(args[4], "rows", 1, LONG_MAX, &rows) < 0 || parse_int(args[5], "cols", 1, LONG_MAX, &cols) < 0 ||
        parse_int(args[6], "group_size", 1, LONG_MAX, &group) < 0 || parse_int(args[7], "bits", 2, 8, &bits) < 0 ||
        parse_int(args[8], "nthreads", 1, 4096, &nthreads) < 0)
        return NULL;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "packed weights have 2, 3, 4 or 8 bits, got %ld", bits);
        return NULL;
    }
    if (cols % SQ_PK_UNIT) {
        PyErr_Format(PyExc_ValueError, "packed weights need in_features (cols) to be a multiple of %d, got %ld",
                     SQ_PK_UNIT, cols);
        return NULL;
    }
    if (group % SQ_PK_UNIT || cols % group) {
        PyErr_Format(PyExc_ValueError,
                     "group_size %ld must be a multiple of %d that divides in_features %ld (per-channel: group_size = "
                     "in_features)",
                     group, SQ_PK_UNIT, cols);
        return NULL;
    }
    sq_pk_matmul_fn fn;
    const char *fn_name = NULL;
    if (args[9] == Py_None) {
        fn = get_state(module)->pk_matmul;
    } else {
        const char *isa = PyUnicode_Check(args[9]) ? PyUnicode_AsUTF8(args[9]) : NULL;
        if (!isa) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "argument 'isa' must be None or a str");
            return NULL;
        }
        fn = strcmp(isa, "auto") == 0 ? NULL : sq_pk_kernel(isa, &fn_name);
        if (!fn) {
            PyErr_Format(PyExc_ValueError, "packed kernels '%s' are not available here (expected 'ref', 'avx2' or "
                         "'avx512' that this CPU supports)", isa);
            return NULL;
        }
    }
    sq_pk_params p = {0};
    p.rows = rows;
    p.cols = cols;
    p.group = group;
    p.bits = (int)bits;
    p.nthreads = (int)nthreads;
    const int64_t nb = sq_pk_row_blocks(rows);
    const int64_t shp_q[4] = {nb, cols / SQ_PK_UNIT, bits, SQ_PK_ROWS};
    const int64_t shp_sm[4] = {nb, cols / group, 2, SQ_PK_ROWS};
    char what_q[96], what_sm[96];
    snprintf(what_q, sizeof what_q, "(%lld, %lld, %ld, %d)", (long long)nb, (long long)(cols / SQ_PK_UNIT), bits,
             SQ_PK_ROWS);
    snprintf(what_sm, sizeof what_sm, "(%lld, %lld, 2, %d)", (long long)nb, (long long)(cols / group), SQ_PK_ROWS);
    view *q = views_add(&s, args[0], "qweight", 0, 0);
    if (!q || view_require_int32(q) < 0 || view_require_shape(q, 4, shp_q, what_q) < 0) goto done;
    view *sm = views_add(&s, args[1], "scale_min", 0, 0);
    if (!sm || view_require_f32(sm) < 0 || view_require_shape(sm, 4, shp_sm, what_sm) < 0) goto done;
    view *x = views_add(&s, args[2], "x", 0, 0);
    if (!x || view_data_dtype(x, &p.x_dtype) < 0) goto done;
    if (x->t->ndim < 1 || x->t->shape[x->t->ndim - 1] != cols) {
        PyErr_Format(PyExc_ValueError, "argument 'x' must have last dimension in_features = %ld", cols);
        goto done;
    }
    p.tokens = x->numel / cols;
    view *y = views_add(&s, args[3], "y", 0, 1);
    if (!y || view_data_dtype(y, &p.y_dtype) < 0) goto done;
    int ok = y->t->ndim == x->t->ndim && y->t->shape[y->t->ndim - 1] == rows;
    for (int d = 0; ok && d < x->t->ndim - 1; ++d) ok = y->t->shape[d] == x->t->shape[d];
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "argument 'y' must have the shape of 'x' with last dimension out_features = %ld",
                     rows);
        goto done;
    }
    if (views_check_aliasing(&s) < 0) goto done;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = fn(&p, (const uint32_t *)q->data, (const float *)sm->data, x->data, y->data);
    Py_END_ALLOW_THREADS
    res = run_status(status, "the packed matmul");
done:
    views_release(&s);
    return res;
}

static PyObject *packed_backend(PyObject *module, PyObject *unused) {
    return PyUnicode_FromString(get_state(module)->pk_name);
}
