/*
 * module.c: sliderquant._C, the only file that includes Python.h.
 *
 * Turns any object with __dlpack__ (torch tensors, numpy arrays, ...) into a borrowed view,
 * validates device, dtype, shape, contiguity, writability and aliasing, raises a precise
 * TypeError/ValueError on anything wrong, then runs the kernel with the GIL released.
 * Keyword arguments and autograd live in the Python wrapper (sliderquant/ops.py); here every
 * function takes positional arguments (METH_FASTCALL).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "sq_dense.h"
#include "sq_dlpack.h"
#include "sq_kernels.h"
#include "sq_packed.h"

typedef struct {
    const sq_kernel_table *kernels;
    sq_pk_matmul_fn pk_matmul; /* packed low-bit matmul (sq_packed.h) */
    const char *pk_name;
    sq_dn_matmul_fn dn_matmul; /* dense bf16 matmul (sq_dense.h) */
    const char *dn_name;
    /* pk_set_exporter: objects of exactly this type are exported by calling fast_export(obj), which
     * must return a DLPack capsule (torch.Tensor: torch._C._to_dlpack_versioned, ~0.3 us against
     * ~2.6 us for Tensor.__dlpack__, whose Python-level checks the caller has made); owned */
    PyObject *fast_type;
    PyObject *fast_export;
} module_state;

/* ------------------------------------------------------------------ DLPack views */

typedef struct {
    const char *name;
    PyObject *capsule; /* owned; renamed to used_* once taken */
    void *managed;     /* SQ_DLManagedTensor* or SQ_DLManagedTensorVersioned* */
    int versioned;
    int readonly;
    SQ_DLTensor *t;
    char *data;
    int64_t numel;
    int64_t nbytes;
} view;

static void view_release(view *v) {
    if (v->managed) {
        /* A producer's deleter may run Python code (numpy's drops a reference; a ctypes deleter is a
         * Python function): it must not run with our pending exception set, nor lose it. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (v->versioned) {
            SQ_DLManagedTensorVersioned *m = (SQ_DLManagedTensorVersioned *)v->managed;
            if (m->deleter) m->deleter(m);
        } else {
            SQ_DLManagedTensor *m = (SQ_DLManagedTensor *)v->managed;
            if (m->deleter) m->deleter(m);
        }
        v->managed = NULL;
        PyErr_Restore(type, value, tb);
    }
    Py_CLEAR(v->capsule);
}

/* the producer's exception, re-raised as a TypeError that names the argument */
static void export_failed(const char *name) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyErr_Format(PyExc_TypeError, "argument '%s' could not be exported through DLPack: %S", name,
                 value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

static PyObject *call_dlpack(PyObject *obj, const char *name) {
    PyObject *meth = PyObject_GetAttrString(obj, "__dlpack__");
    if (!meth) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be a tensor supporting DLPack (__dlpack__), got %s",
                     name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyObject *kwargs = Py_BuildValue("{s:(ii)}", "max_version", SQ_DLPACK_MAJOR, SQ_DLPACK_MINOR);
    PyObject *args = PyTuple_New(0);
    PyObject *cap = (kwargs && args) ? PyObject_Call(meth, args, kwargs) : NULL;
    Py_XDECREF(kwargs);
    Py_XDECREF(args);
    if (!cap && PyErr_ExceptionMatches(PyExc_TypeError)) {
        /* a producer older than DLPack 1.0 does not know max_version */
        PyErr_Clear();
        cap = PyObject_CallNoArgs(meth);
    }
    Py_DECREF(meth);
    if (!cap) export_failed(name);
    return cap;
}

/* A producer may hand over any shape: more dimensions than anything real, or sizes whose product
 * does not fit in int64 (signed overflow is undefined behaviour in C).  Count with checks. */
#define SQ_MAX_NDIM 32

static int view_count(const view *v, int64_t *numel) {
    const SQ_DLTensor *t = v->t;
    int64_t n = 1;
    for (int d = 0; d < t->ndim; ++d) {
        if (t->shape[d] < 0) {
            PyErr_Format(PyExc_ValueError, "argument '%s' has a negative dimension", v->name);
            return -1;
        }
        if (t->shape[d] == 0) n = 0;
    }
    for (int d = 0; n && d < t->ndim; ++d) {
        if (__builtin_mul_overflow(n, t->shape[d], &n)) {
            PyErr_Format(PyExc_ValueError, "argument '%s' has an impossible shape: its element count overflows 64 bits",
                         v->name);
            return -1;
        }
    }
    *numel = n;
    return 0;
}

/* (After view_count: with no zero dimension, every prefix product fits in int64.) */
static int check_contiguous(const view *v) {
    const SQ_DLTensor *t = v->t;
    if (!t->strides || v->numel == 0) return 1;
    int64_t expected = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
        if (t->shape[d] != 1 && t->strides[d] != expected) return 0;
        expected *= t->shape[d];
    }
    return 1;
}

/* obj's capsule through the fast exporter (module_state.fast_*) when fast_type/fast_export are given
 * and obj is exactly of that type, else through obj.__dlpack__. */
static PyObject *export_capsule(PyObject *obj, const char *name, PyObject *fast_type, PyObject *fast_export) {
    if (!fast_export || (PyObject *)Py_TYPE(obj) != fast_type) return call_dlpack(obj, name);
    PyObject *cap = PyObject_CallOneArg(fast_export, obj);
    if (!cap) export_failed(name);
    return cap;
}

/* Takes obj's DLPack capsule; on failure sets an exception and leaves v empty. */
static int view_import(PyObject *obj, const char *name, int writable, view *v, PyObject *fast_type,
                       PyObject *fast_export) {
    memset(v, 0, sizeof *v);
    v->name = name;
    PyObject *cap = export_capsule(obj, name, fast_type, fast_export);
    if (!cap) return -1;
    v->capsule = cap;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        SQ_DLManagedTensorVersioned *m = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (m->version.major != SQ_DLPACK_MAJOR) {
            /* a newer major version may change the struct: do not take ownership */
            PyErr_Format(PyExc_TypeError, "argument '%s': DLPack version %u.%u is not supported (need 1.x)", name,
                         m->version.major, m->version.minor);
            Py_CLEAR(v->capsule);
            return -1;
        }
        if (PyCapsule_SetName(cap, "used_dltensor_versioned") < 0) {
            Py_CLEAR(v->capsule);
            return -1;
        }
        v->managed = m;
        v->versioned = 1;
        v->readonly = (m->flags & SQ_DLPACK_FLAG_READ_ONLY) != 0;
        v->t = &m->dl_tensor;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        SQ_DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
        if (PyCapsule_SetName(cap, "used_dltensor") < 0) {
            Py_CLEAR(v->capsule);
            return -1;
        }
        v->managed = m;
        v->t = &m->dl_tensor;
    } else {
        PyErr_Format(PyExc_TypeError, "argument '%s': __dlpack__() did not return a DLPack capsule", name);
        Py_CLEAR(v->capsule);
        return -1;
    }
    const SQ_DLTensor *t = v->t;
    if (t->device.device_type != SQ_kDLCPU) {
        PyErr_Format(PyExc_ValueError,
                     "argument '%s' is on device type %d; the C kernels run on CPU tensors only "
                     "(sliderquant.ops uses the torch path for other devices)",
                     name, (int)t->device.device_type);
        goto fail;
    }
    if (t->dtype.lanes != 1) {
        PyErr_Format(PyExc_TypeError, "argument '%s': vector dtypes (lanes=%d) are not supported", name,
                     (int)t->dtype.lanes);
        goto fail;
    }
    if (t->ndim < 0 || t->ndim > SQ_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "argument '%s' has %d dimensions; at most %d are supported", name,
                     (int)t->ndim, SQ_MAX_NDIM);
        goto fail;
    }
    if (t->ndim > 0 && !t->shape) {
        PyErr_Format(PyExc_ValueError, "argument '%s': the DLPack tensor has no shape array", name);
        goto fail;
    }
    if (view_count(v, &v->numel) < 0) goto fail;
    if (v->numel > 0 && !t->data) {
        PyErr_Format(PyExc_ValueError, "argument '%s': the DLPack tensor has a NULL data pointer", name);
        goto fail;
    }
    if (!check_contiguous(v)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must be C-contiguous (call .contiguous())", name);
        goto fail;
    }
    if (writable && v->readonly) {
        PyErr_Format(PyExc_ValueError, "argument '%s' is an output but its DLPack export is read-only", name);
        goto fail;
    }
    v->data = (char *)t->data + t->byte_offset;
    if (__builtin_mul_overflow(v->numel, (int64_t)((t->dtype.bits + 7) / 8), &v->nbytes)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' is too large: its size in bytes overflows 64 bits", name);
        goto fail;
    }
    return 0;
fail:
    view_release(v);
    return -1;
}

static const char *dtype_name(SQ_DLDataType dt) {
    if (dt.code == SQ_kDLFloat && dt.bits == 32) return "float32";
    if (dt.code == SQ_kDLFloat && dt.bits == 16) return "float16";
    if (dt.code == SQ_kDLFloat && dt.bits == 64) return "float64";
    if (dt.code == SQ_kDLBfloat && dt.bits == 16) return "bfloat16";
    if (dt.code == SQ_kDLInt) return "an integer dtype";
    if (dt.code == SQ_kDLUInt) return "an unsigned integer dtype";
    if (dt.code == SQ_kDLBool) return "bool";
    return "an unsupported dtype";
}

/* float32 or bfloat16 data tensor */
static int view_data_dtype(const view *v, sq_dtype *out) {
    SQ_DLDataType dt = v->t->dtype;
    if (dt.code == SQ_kDLFloat && dt.bits == 32) {
        *out = SQ_F32;
        return 0;
    }
    if (dt.code == SQ_kDLBfloat && dt.bits == 16) {
        *out = SQ_BF16;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "argument '%s' must be float32 or bfloat16, got %s", v->name, dtype_name(dt));
    return -1;
}

static int view_require_f32(const view *v) {
    SQ_DLDataType dt = v->t->dtype;
    if (dt.code == SQ_kDLFloat && dt.bits == 32) return 0;
    PyErr_Format(PyExc_TypeError, "argument '%s' must be float32, got %s", v->name, dtype_name(dt));
    return -1;
}

static void format_shape(const view *v, char *buf, size_t n) {
    size_t used = (size_t)snprintf(buf, n, "(");
    for (int d = 0; d < v->t->ndim && used < n; ++d)
        used += (size_t)snprintf(buf + used, n - used, d ? ", %lld" : "%lld", (long long)v->t->shape[d]);
    if (used < n) snprintf(buf + used, n - used, v->t->ndim == 1 ? ",)" : ")");
}

/* exact shape check; dims < 0 in `shape` are not checked */
static int view_require_shape(const view *v, int ndim, const int64_t *shape, const char *what) {
    int ok = v->t->ndim == ndim;
    for (int d = 0; ok && d < ndim; ++d) ok = shape[d] < 0 || v->t->shape[d] == shape[d];
    if (ok) return 0;
    char got[128];
    format_shape(v, got, sizeof got);
    PyErr_Format(PyExc_ValueError, "argument '%s' must have shape %s, got %s", v->name, what, got);
    return -1;
}

/* ------------------------------------------------------------------ argument sets */

#define MAX_VIEWS 16

typedef struct {
    view v[MAX_VIEWS];
    int is_output[MAX_VIEWS];
    int n;
} view_set;

static void views_release(view_set *s) {
    for (int k = 0; k < s->n; ++k) view_release(&s->v[k]);
    s->n = 0;
}

/* Imports obj into the set (through the exporter fast_export for objects of exactly fast_type, see
 * module_state; NULL: __dlpack__); None gives NULL (allowed only when optional). */
static view *views_add_via(view_set *s, PyObject *obj, const char *name, int optional, int output,
                           PyObject *fast_type, PyObject *fast_export) {
    if (obj == Py_None) {
        if (!optional) PyErr_Format(PyExc_TypeError, "argument '%s' is required, got None", name);
        return NULL;
    }
    view *v = &s->v[s->n];
    if (view_import(obj, name, output, v, fast_type, fast_export) < 0) return NULL;
    s->is_output[s->n++] = output;
    return v;
}

static view *views_add(view_set *s, PyObject *obj, const char *name, int optional, int output) {
    return views_add_via(s, obj, name, optional, output, NULL, NULL);
}

/* whether two non-empty views share a byte */
static int views_overlap(const view *a, const view *b) {
    return a->nbytes && b->nbytes && a->data < b->data + b->nbytes && b->data < a->data + a->nbytes;
}

/* No output may overlap any other argument. */
static int views_check_aliasing(const view_set *s) {
    for (int a = 0; a < s->n; ++a) {
        if (!s->is_output[a]) continue;
        for (int b = 0; b < s->n; ++b) {
            if (b != a && views_overlap(&s->v[a], &s->v[b])) {
                PyErr_Format(PyExc_ValueError, "output '%s' overlaps argument '%s' in memory; outputs must be fresh tensors",
                             s->v[a].name, s->v[b].name);
                return -1;
            }
        }
    }
    return 0;
}

static const void *data_or_null(const view *v) { return v ? v->data : NULL; }

static int parse_int(PyObject *o, const char *name, long lo, long hi, long *out) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must be an int, got %s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must lie in [%ld, %ld], got %R", name, lo, hi, o);
        return -1;
    }
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must lie in [%ld, %ld], got %ld", name, lo, hi, v);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_float(PyObject *o, const char *name, float *out) {
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    if (!isfinite(v)) {
        PyErr_Format(PyExc_ValueError, "argument '%s' must be finite", name);
        return -1;
    }
    *out = (float)v;
    return 0;
}

static int check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *fn) {
    if (nargs == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", fn, want, nargs);
    return -1;
}

static PyObject *raise_status(int status, const char *what) {
    switch (status) {
    case SQ_ERR_NONFINITE_INPUT:
        PyErr_Format(PyExc_ValueError,
                     "%s contains NaN or Inf; quantization needs finite values (check the model weights, "
                     "the inputs and the learned channel scales / LoRA factors)",
                     what);
        break;
    case SQ_ERR_NONFINITE_PARAM:
        PyErr_Format(PyExc_ValueError,
                     "the quantization scale of %s is NaN or Inf: the clipping logits (lwc_upper / "
                     "lwc_lower; or factors, lwc_param linear) are not finite",
                     what);
        break;
    case SQ_ERR_NONFINITE_ROUND_V:
        PyErr_Format(PyExc_ValueError,
                     "the rounding offset (round_v) of %s contains NaN or Inf in its quantized columns; it must be "
                     "finite (it is projected to [-0.5, 0.5] during training)",
                     what);
        break;
    case SQ_ERR_NOMEM:
        PyErr_NoMemory();
        break;
    default:
        PyErr_Format(PyExc_RuntimeError, "sliderquant kernel failed with status %d", status);
    }
    return NULL;
}

static module_state *get_state(PyObject *module) { return (module_state *)PyModule_GetState(module); }

/* ------------------------------------------------------------------ weight fake quantization */

typedef struct {
    sq_wq_params p;
    sq_wq_inputs in;
    int64_t n_groups;
} wq_call;

/* Parses and validates the common leading arguments (w, alpha, lora_a, lora_b, lwc_u, lwc_l) and
 * the trailing scalars (bits, group_size, n_quant, symmetric, lora_scaling, nthreads). */
static int wq_parse(view_set *s, PyObject *const *head, PyObject *const *tail, wq_call *c) {
    memset(c, 0, sizeof *c);
    long bits, group, n_quant, nthreads;
    if (parse_int(tail[0], "bits", 2, 8, &bits) < 0) return -1;
    if (parse_int(tail[1], "group_size", 0, INT32_MAX, &group) < 0) return -1;
    if (parse_int(tail[2], "n_quant", 0, LONG_MAX, &n_quant) < 0) return -1;
    int symmetric = PyObject_IsTrue(tail[3]);
    if (symmetric < 0) return -1;
    if (parse_float(tail[4], "lora_scaling", &c->p.lora_scaling) < 0) return -1;
    if (parse_int(tail[5], "nthreads", 1, 4096, &nthreads) < 0) return -1;

    view *w = views_add(s, head[0], "w", 0, 0);
    if (!w) return -1;
    if (view_data_dtype(w, &c->p.dtype) < 0) return -1;
    c->p.out_dtype = c->p.dtype;
    if (w->t->ndim != 2) {
        PyErr_Format(PyExc_ValueError, "argument 'w' must be 2-D (out_features, in_features), got %d-D", w->t->ndim);
        return -1;
    }
    const int64_t rows = w->t->shape[0], cols = w->t->shape[1];
    if (rows == 0 || cols == 0) {
        PyErr_SetString(PyExc_ValueError, "argument 'w' is empty");
        return -1;
    }
    if (group == 0) group = cols;
    if (cols % group != 0) {
        PyErr_Format(PyExc_ValueError, "group_size %ld does not divide in_features %lld", group, (long long)cols);
        return -1;
    }
    if (n_quant > cols || (group != cols && n_quant % group != 0)) {
        PyErr_Format(PyExc_ValueError, "n_quant %ld must be at most %lld and a multiple of the group size %ld", n_quant,
                     (long long)cols, group);
        return -1;
    }
    const int64_t n_groups = cols / group;
    c->p.rows = rows;
    c->p.cols = cols;
    c->p.group = group;
    c->p.n_quant = n_quant;
    c->p.bits = (int)bits;
    c->p.symmetric = symmetric;
    c->p.nthreads = (int)nthreads;
    c->n_groups = n_groups;
    c->in.w = w->data;

    const int64_t shp_alpha[1] = {cols};
    view *alpha = views_add(s, head[1], "channel_scale", 1, 0);
    if (!alpha && PyErr_Occurred()) return -1;
    if (alpha && (view_require_f32(alpha) < 0 || view_require_shape(alpha, 1, shp_alpha, "(in_features,)") < 0))
        return -1;
    c->in.alpha = data_or_null(alpha);

    view *a = views_add(s, head[2], "lora_a", 1, 0);
    if (!a && PyErr_Occurred()) return -1;
    view *b = views_add(s, head[3], "lora_b", 1, 0);
    if (!b && PyErr_Occurred()) return -1;
    if ((a == NULL) != (b == NULL)) {
        PyErr_SetString(PyExc_ValueError, "lora_a and lora_b must be given together");
        return -1;
    }
    if (a) {
        if (view_require_f32(a) < 0 || view_require_f32(b) < 0) return -1;
        const int64_t rank = a->t->ndim == 2 ? a->t->shape[0] : -1;
        if (rank < 1 || rank > SQ_MAX_RANK) {
            PyErr_Format(PyExc_ValueError, "lora_a must be 2-D (rank, in_features) with 1 <= rank <= %d", SQ_MAX_RANK);
            return -1;
        }
        const int64_t shp_a[2] = {rank, cols}, shp_b[2] = {rows, rank};
        if (view_require_shape(a, 2, shp_a, "(rank, in_features)") < 0 ||
            view_require_shape(b, 2, shp_b, "(out_features, rank)") < 0)
            return -1;
        c->p.rank = (int)rank;
        c->in.lora_a = (const float *)a->data;
        c->in.lora_b = (const float *)b->data;
    }
    const int64_t shp_lwc[2] = {rows, n_groups};
    const char *names[2] = {"lwc_upper", "lwc_lower"};
    for (int k = 0; k < 2; ++k) {
        view *lv = views_add(s, head[4 + k], names[k], 1, 0);
        if (!lv && PyErr_Occurred()) return -1;
        if (lv && (view_require_f32(lv) < 0 || view_require_shape(lv, 2, shp_lwc, "(out_features, n_groups)") < 0))
            return -1;
        if (k == 0)
            c->in.lwc_u = data_or_null(lv);
        else
            c->in.lwc_l = data_or_null(lv);
    }
    return 0;
}

/* a float32 output of the given shape, or None */
static int add_grad(view_set *s, PyObject *obj, const char *name, int ndim, const int64_t *shape, const char *what,
                    int allowed, float **out) {
    *out = NULL;
    view *v = views_add(s, obj, name, 1, 1);
    if (!v) return PyErr_Occurred() ? -1 : 0;
    if (!allowed) {
        PyErr_Format(PyExc_ValueError, "'%s' was requested but its input is absent", name);
        return -1;
    }
    if (view_require_f32(v) < 0 || view_require_shape(v, ndim, shape, what) < 0) return -1;
    *out = (float *)v->data;
    return 0;
}

/* A float32/bfloat16 tensor with the shape of `like`.  Its dtype must be `dtype`, unless `got` is
 * given: then either data dtype is accepted and reported there. */
static int add_data_like(view_set *s, PyObject *obj, const char *name, int output, const view *like, sq_dtype dtype,
                         void **out, sq_dtype *got) {
    view *v = views_add(s, obj, name, 0, output);
    if (!v) return -1;
    sq_dtype dt;
    if (view_data_dtype(v, &dt) < 0) return -1;
    if (got) *got = dt;
    if (!got && dt != dtype) {
        PyErr_Format(PyExc_TypeError, "argument '%s' must have the dtype of '%s' (%s)", name, like->name,
                     dtype_name(like->t->dtype));
        return -1;
    }
    if (view_require_shape(v, like->t->ndim, like->t->shape, "equal to that of the input") < 0) return -1;
    *out = v->data;
    return 0;
}

static PyObject *run_status(int status, const char *what) {
    if (status != SQ_OK) return raise_status(status, what);
    Py_RETURN_NONE;
}

/* The optional trailing arguments: the rounding offset V (None, or float32 of the weight's shape) and
 * whether the LWC parameters are linear factors. */
static int add_round_v(view_set *s, PyObject *obj, wq_call *c) {
    view *v = views_add(s, obj, "round_v", 1, 0);
    if (!v) return PyErr_Occurred() ? -1 : 0;
    const int64_t shp[2] = {c->p.rows, c->p.cols};
    if (view_require_f32(v) < 0 || view_require_shape(v, 2, shp, "(out_features, in_features)") < 0) return -1;
    c->in.round_v = (const float *)v->data;
    return 0;
}

static int parse_lwc_linear(PyObject *obj, wq_call *c) {
    if (!PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "argument 'lwc_linear' must be a bool, got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    c->p.lwc_linear = obj == Py_True;
    return 0;
}

/* The trailing optional arguments of the weight entry points: none (the original form) or all of them. */
static int check_nargs_either(Py_ssize_t nargs, Py_ssize_t base, Py_ssize_t full, const char *fn) {
    if (nargs == base || nargs == full) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd or %zd positional arguments (%zd given)", fn, base, full, nargs);
    return -1;
}

PyDoc_STRVAR(wq_forward_doc,
             "wq_forward(w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, out, bits, group_size, n_quant,\n"
             "           symmetric, lora_scaling, nthreads[, round_v, lwc_linear])\n--\n\n"
             "Weight fake quantization: out = Q(w * channel_scale + lora_scaling * lora_b @ lora_a) with learnable\n"
             "clipping. group_size 0 means per output channel. Optional inputs may be None. out is float32 or\n"
             "bfloat16, independently of w (e.g. a bf16 result from an fp32 master weight). round_v (float32,\n"
             "the shape of w, or None) is the rounding offset V: codes round(Wt / s + V). lwc_linear (bool): the\n"
             "clipping parameters are the factors (hi = lwc_upper * max) instead of logits (sigmoid(lwc_upper) * max).");

static PyObject *wq_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs_either(nargs, 13, 15, "wq_forward") < 0) return NULL;
    view_set s = {0};
    wq_call c;
    void *out;
    PyObject *res = NULL;
    if (wq_parse(&s, args, args + 7, &c) < 0) goto done;
    if (nargs > 13 && (add_round_v(&s, args[13], &c) < 0 || parse_lwc_linear(args[14], &c) < 0)) goto done;
    if (add_data_like(&s, args[6], "out", 1, &s.v[0], c.p.dtype, &out, &c.p.out_dtype) < 0) goto done;
    if (views_check_aliasing(&s) < 0) goto done;
    const sq_kernel_table *k = get_state(module)->kernels;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = k->wq_forward(&c.p, &c.in, out);
    Py_END_ALLOW_THREADS
    res = run_status(status, "the weight (W * channel_scale + LoRA)");
done:
    views_release(&s);
    return res;
}

PyDoc_STRVAR(wq_backward_doc,
             "wq_backward(w, channel_scale, lora_a, lora_b, lwc_upper, lwc_lower, grad_out, grad_channel_scale,\n"
             "            grad_lora_a, grad_lora_b, grad_lwc_upper, grad_lwc_lower, grad_wt, bits, group_size,\n"
             "            n_quant, symmetric, lora_scaling, nthreads[, round_v, grad_round_v, lwc_linear])\n--\n\n"
             "Backward of wq_forward (straight-through rounding). grad_out has the dtype of wq_forward's out;\n"
             "each grad_* output is a float32 tensor or None.");

static PyObject *wq_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs_either(nargs, 19, 22, "wq_backward") < 0) return NULL;
    view_set s = {0};
    wq_call c;
    sq_wq_grads g = {0};
    PyObject *res = NULL;
    void *grad_out;
    if (wq_parse(&s, args, args + 13, &c) < 0) goto done;
    if (nargs > 19 && (add_round_v(&s, args[19], &c) < 0 || parse_lwc_linear(args[21], &c) < 0)) goto done;
    if (add_data_like(&s, args[6], "grad_out", 0, &s.v[0], c.p.dtype, &grad_out, &c.p.out_dtype) < 0) goto done;
    g.grad_out = grad_out;
    const int64_t rows = c.p.rows, cols = c.p.cols, r = c.p.rank;
    const int64_t shp_alpha[1] = {cols}, shp_a[2] = {r, cols}, shp_b[2] = {rows, r},
                  shp_lwc[2] = {rows, c.n_groups}, shp_w[2] = {rows, cols};
    if (add_grad(&s, args[7], "grad_channel_scale", 1, shp_alpha, "(in_features,)", c.in.alpha != NULL,
                 &g.grad_alpha) < 0 ||
        add_grad(&s, args[8], "grad_lora_a", 2, shp_a, "(rank, in_features)", r > 0, &g.grad_a) < 0 ||
        add_grad(&s, args[9], "grad_lora_b", 2, shp_b, "(out_features, rank)", r > 0, &g.grad_b) < 0 ||
        add_grad(&s, args[10], "grad_lwc_upper", 2, shp_lwc, "(out_features, n_groups)", c.in.lwc_u != NULL,
                 &g.grad_u) < 0 ||
        add_grad(&s, args[11], "grad_lwc_lower", 2, shp_lwc, "(out_features, n_groups)", c.in.lwc_l != NULL,
                 &g.grad_l) < 0 ||
        add_grad(&s, args[12], "grad_wt", 2, shp_w, "(out_features, in_features)", 1, &g.grad_wt) < 0 ||
        (nargs > 19 && add_grad(&s, args[20], "grad_round_v", 2, shp_w, "(out_features, in_features)",
                                c.in.round_v != NULL, &g.grad_v) < 0))
        goto done;
    if (views_check_aliasing(&s) < 0) goto done;
    const sq_kernel_table *k = get_state(module)->kernels;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = k->wq_backward(&c.p, &c.in, &g);
    Py_END_ALLOW_THREADS
    res = run_status(status, "the weight (W * channel_scale + LoRA)");
done:
    views_release(&s);
    return res;
}

/* ------------------------------------------------------------------ activation fake quantization */

static int aq_parse(view_set *s, PyObject *x_obj, PyObject *alpha_obj, PyObject *const *tail, sq_aq_params *p,
                    const float **alpha_out) {
    memset(p, 0, sizeof *p);
    long bits, n_quant, nthreads;
    if (parse_int(tail[0], "bits", 2, 8, &bits) < 0) return -1;
    if (parse_int(tail[1], "n_quant", 0, LONG_MAX, &n_quant) < 0) return -1;
    int symmetric = PyObject_IsTrue(tail[2]);
    if (symmetric < 0) return -1;
    if (parse_int(tail[3], "nthreads", 1, 4096, &nthreads) < 0) return -1;
    view *x = views_add(s, x_obj, "x", 0, 0);
    if (!x) return -1;
    if (view_data_dtype(x, &p->dtype) < 0) return -1;
    if (x->t->ndim < 1 || x->numel == 0) {
        PyErr_SetString(PyExc_ValueError, "argument 'x' must have at least one dimension and be non-empty");
        return -1;
    }
    p->cols = x->t->shape[x->t->ndim - 1];
    p->rows = x->numel / p->cols;
    if (n_quant > p->cols) {
        PyErr_Format(PyExc_ValueError, "n_quant %ld exceeds the last dimension %lld", n_quant, (long long)p->cols);
        return -1;
    }
    p->n_quant = n_quant;
    p->bits = (int)bits;
    p->symmetric = symmetric;
    p->nthreads = (int)nthreads;
    const int64_t shp_alpha[1] = {p->cols};
    view *alpha = views_add(s, alpha_obj, "channel_scale", 1, 0);
    if (!alpha && PyErr_Occurred()) return -1;
    if (alpha && (view_require_f32(alpha) < 0 || view_require_shape(alpha, 1, shp_alpha, "(channels,)") < 0))
        return -1;
    *alpha_out = data_or_null(alpha);
    return 0;
}

PyDoc_STRVAR(aq_forward_doc, "aq_forward(x, channel_scale, out, bits, n_quant, symmetric, nthreads)\n--\n\n"
                             "Per-token activation fake quantization of x / channel_scale into out.");

static PyObject *aq_forward(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 7, "aq_forward") < 0) return NULL;
    view_set s = {0};
    sq_aq_params p;
    const float *alpha;
    void *out;
    PyObject *res = NULL;
    if (aq_parse(&s, args[0], args[1], args + 3, &p, &alpha) < 0) goto done;
    if (add_data_like(&s, args[2], "out", 1, &s.v[0], p.dtype, &out, NULL) < 0) goto done;
    if (views_check_aliasing(&s) < 0) goto done;
    const sq_kernel_table *k = get_state(module)->kernels;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = k->aq_forward(&p, s.v[0].data, alpha, out);
    Py_END_ALLOW_THREADS
    res = run_status(status, "the activation (x / channel_scale)");
done:
    views_release(&s);
    return res;
}

PyDoc_STRVAR(aq_backward_doc,
             "aq_backward(x, channel_scale, grad_out, grad_x, grad_channel_scale, bits, n_quant, symmetric, nthreads)\n"
             "--\n\nBackward of aq_forward; grad_x (dtype of x) and grad_channel_scale (float32) may be None.");

static PyObject *aq_backward(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 9, "aq_backward") < 0) return NULL;
    view_set s = {0};
    sq_aq_params p;
    const float *alpha;
    void *grad_out, *grad_x = NULL;
    float *grad_alpha = NULL;
    PyObject *res = NULL;
    if (aq_parse(&s, args[0], args[1], args + 5, &p, &alpha) < 0) goto done;
    if (add_data_like(&s, args[2], "grad_out", 0, &s.v[0], p.dtype, &grad_out, NULL) < 0) goto done;
    if (args[3] != Py_None && add_data_like(&s, args[3], "grad_x", 1, &s.v[0], p.dtype, &grad_x, NULL) < 0) goto done;
    const int64_t shp_alpha[1] = {p.cols};
    if (add_grad(&s, args[4], "grad_channel_scale", 1, shp_alpha, "(channels,)", alpha != NULL, &grad_alpha) < 0)
        goto done;
    if (views_check_aliasing(&s) < 0) goto done;
    const sq_kernel_table *k = get_state(module)->kernels;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = k->aq_backward(&p, s.v[0].data, alpha, grad_out, grad_x, grad_alpha);
    Py_END_ALLOW_THREADS
    res = run_status(status, "the activation (x / channel_scale)");
done:
    views_release(&s);
    return res;
}

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

/* the isa argument of the inference kernels: None (*isa = NULL: the active kernels) or a kernel name
 * ('auto' is a choice of set_backend, not a kernel: the callers refuse it) */
static int parse_isa(PyObject *o, const char **isa) {
    *isa = NULL;
    if (o == Py_None) return 0;
    *isa = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (*isa) return 0;
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "argument 'isa' must be None or a str");
    return -1;
}

static PyObject *isa_unavailable(const char *which, const char *isa) {
    PyErr_Format(PyExc_ValueError, "%s kernels '%s' are not available here (expected 'ref', 'avx2' or "
                 "'avx512' that this CPU supports)", which, isa);
    return NULL;
}

/* rows, cols, group and bits of a packed weight: parsed from args[0..3] and checked */
typedef struct {
    long rows, cols, group, bits;
} pk_shape;

static int pk_parse_shape(PyObject *const *args, pk_shape *g) {
    if (parse_int(args[0], "rows", 1, LONG_MAX, &g->rows) < 0 || parse_int(args[1], "cols", 1, LONG_MAX, &g->cols) < 0 ||
        parse_int(args[2], "group_size", 1, LONG_MAX, &g->group) < 0 || parse_int(args[3], "bits", 2, 8, &g->bits) < 0)
        return -1;
    if (g->bits != 2 && g->bits != 3 && g->bits != 4 && g->bits != 8) {
        PyErr_Format(PyExc_ValueError, "packed weights have 2, 3, 4 or 8 bits, got %ld", g->bits);
        return -1;
    }
    if (g->cols % SQ_PK_UNIT) {
        PyErr_Format(PyExc_ValueError, "packed weights need in_features (cols) to be a multiple of %d, got %ld",
                     SQ_PK_UNIT, g->cols);
        return -1;
    }
    if (g->group % SQ_PK_UNIT || g->cols % g->group) {
        PyErr_Format(PyExc_ValueError,
                     "group_size %ld must be a multiple of %d that divides in_features %ld (per-channel: group_size = "
                     "in_features)",
                     g->group, SQ_PK_UNIT, g->cols);
        return -1;
    }
    return 0;
}

/* imports qweight and scale_min into s and checks them against g */
static int pk_add_weight(view_set *s, PyObject *qweight, PyObject *scale_min, const pk_shape *g, view **q,
                         view **sm) {
    const int64_t nb = sq_pk_row_blocks(g->rows);
    const int64_t shp_q[4] = {nb, g->cols / SQ_PK_UNIT, g->bits, SQ_PK_ROWS};
    const int64_t shp_sm[4] = {nb, g->cols / g->group, 2, SQ_PK_ROWS};
    char what_q[96], what_sm[96];
    snprintf(what_q, sizeof what_q, "(%lld, %lld, %ld, %d)", (long long)nb, (long long)(g->cols / SQ_PK_UNIT), g->bits,
             SQ_PK_ROWS);
    snprintf(what_sm, sizeof what_sm, "(%lld, %lld, 2, %d)", (long long)nb, (long long)(g->cols / g->group),
             SQ_PK_ROWS);
    *q = views_add(s, qweight, "qweight", 0, 0);
    if (!*q || view_require_int32(*q) < 0 || view_require_shape(*q, 4, shp_q, what_q) < 0) return -1;
    *sm = views_add(s, scale_min, "scale_min", 0, 0);
    if (!*sm || view_require_f32(*sm) < 0 || view_require_shape(*sm, 4, shp_sm, what_sm) < 0) return -1;
    return 0;
}

/* imports x and y (through the module's fast exporter when fast is set) and fills p's tokens and dtypes */
static int pk_add_xy(view_set *s, PyObject *xo, PyObject *yo, const pk_shape *g, sq_pk_params *p,
                     const module_state *fast, view **x, view **y) {
    PyObject *ft = fast ? fast->fast_type : NULL, *fe = fast ? fast->fast_export : NULL;
    *x = views_add_via(s, xo, "x", 0, 0, ft, fe);
    if (!*x || view_data_dtype(*x, &p->x_dtype) < 0) return -1;
    if ((*x)->t->ndim < 1 || (*x)->t->shape[(*x)->t->ndim - 1] != g->cols) {
        PyErr_Format(PyExc_ValueError, "argument 'x' must have last dimension in_features = %ld", g->cols);
        return -1;
    }
    p->tokens = (*x)->numel / g->cols;
    *y = views_add_via(s, yo, "y", 0, 1, ft, fe);
    if (!*y || view_data_dtype(*y, &p->y_dtype) < 0) return -1;
    int ok = (*y)->t->ndim == (*x)->t->ndim && (*y)->t->shape[(*y)->t->ndim - 1] == g->rows;
    for (int d = 0; ok && d < (*x)->t->ndim - 1; ++d) ok = (*y)->t->shape[d] == (*x)->t->shape[d];
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "argument 'y' must have the shape of 'x' with last dimension out_features = %ld",
                     g->rows);
        return -1;
    }
    return 0;
}

static PyObject *pk_run(sq_pk_matmul_fn fn, const sq_pk_params *p, const view *q, const view *sm, const view *x,
                        view *y) {
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = fn(p, (const uint32_t *)q->data, (const float *)sm->data, x->data, y->data);
    Py_END_ALLOW_THREADS
    return run_status(status, "the packed matmul");
}

static PyObject *pk_matmul(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 10, "pk_matmul") < 0) return NULL;
    view_set s = {0};
    PyObject *res = NULL;
    pk_shape g;
    long nthreads;
    if (pk_parse_shape(args + 4, &g) < 0 || parse_int(args[8], "nthreads", 1, 4096, &nthreads) < 0) return NULL;
    const char *isa;
    if (parse_isa(args[9], &isa) < 0) return NULL;
    sq_pk_matmul_fn fn = !isa ? get_state(module)->pk_matmul : strcmp(isa, "auto") ? sq_pk_kernel(isa, NULL) : NULL;
    if (!fn) return isa_unavailable("packed", isa);
    sq_pk_params p = {0};
    p.rows = g.rows;
    p.cols = g.cols;
    p.group = g.group;
    p.bits = (int)g.bits;
    p.nthreads = (int)nthreads;
    view *q, *sm, *x, *y;
    if (pk_add_weight(&s, args[0], args[1], &g, &q, &sm) < 0) goto done;
    if (pk_add_xy(&s, args[2], args[3], &g, &p, NULL, &x, &y) < 0) goto done;
    if (views_check_aliasing(&s) < 0) goto done;
    res = pk_run(fn, &p, q, sm, x, y);
done:
    views_release(&s);
    return res;
}

/* ------------------------------------------------------------------ packed weight handles */

/* A packed weight imported once: its two DLPack views (whose capsules keep the storage alive),
 * checked against rows/cols/group/bits at creation, so that a decode step's calls only import x and y. */
typedef struct {
    PyObject_HEAD
    view_set s; /* v[0] qweight, v[1] scale_min */
    pk_shape g;
    PyObject *weakreflist;
} PackedWeight;

static void packed_weight_dealloc(PackedWeight *self) {
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    views_release(&self->s);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *packed_weight_repr(PackedWeight *self) {
    return PyUnicode_FromFormat("<sliderquant._C.PackedWeight rows=%ld cols=%ld group_size=%ld bits=%ld>", self->g.rows,
                                self->g.cols, self->g.group, self->g.bits);
}

static PyObject *packed_weight_get(PackedWeight *self, void *which) {
    switch ((int)(intptr_t)which) {
    case 0: return PyLong_FromLong(self->g.rows);
    case 1: return PyLong_FromLong(self->g.cols);
    case 2: return PyLong_FromLong(self->g.group);
    case 3: return PyLong_FromLong(self->g.bits);
    case 4: return PyLong_FromVoidPtr(self->s.v[0].data);
    default: return PyLong_FromVoidPtr(self->s.v[1].data);
    }
}

static PyGetSetDef packed_weight_getset[] = {
    {"rows", (getter)packed_weight_get, NULL, "output features", (void *)0},
    {"cols", (getter)packed_weight_get, NULL, "input features", (void *)1},
    {"group_size", (getter)packed_weight_get, NULL, "columns per group", (void *)2},
    {"bits", (getter)packed_weight_get, NULL, "bits per code (container width)", (void *)3},
    {"qweight_ptr", (getter)packed_weight_get, NULL, "address of the codes it reads", (void *)4},
    {"scale_min_ptr", (getter)packed_weight_get, NULL, "address of the scales and mins it reads", (void *)5},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PackedWeightType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sliderquant._C.PackedWeight",
    .tp_doc = "A packed weight imported once through DLPack (made by pk_weight, used by pk_linear).",
    .tp_basicsize = sizeof(PackedWeight),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)packed_weight_dealloc,
    .tp_repr = (reprfunc)packed_weight_repr,
    .tp_getset = packed_weight_getset,
    .tp_weaklistoffset = offsetof(PackedWeight, weakreflist),
};

PyDoc_STRVAR(pk_weight_doc,
             "pk_weight(qweight, scale_min, rows, cols, group_size, bits)\n--\n\n"
             "Imports a packed weight (layout as in pk_matmul) once and returns a PackedWeight for pk_linear.\n"
             "It holds the tensors' DLPack exports, so their storage lives as long as the handle; writes into\n"
             "the same storage (copy_) are seen, a tensor replaced by another one is not.");

static PyObject *pk_weight(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 6, "pk_weight") < 0) return NULL;
    pk_shape g;
    if (pk_parse_shape(args + 2, &g) < 0) return NULL;
    PackedWeight *self = PyObject_New(PackedWeight, &PackedWeightType);
    if (!self) return NULL;
    memset(&self->s, 0, sizeof self->s);
    self->g = g;
    self->weakreflist = NULL;
    view *q, *sm;
    if (pk_add_weight(&self->s, args[0], args[1], &g, &q, &sm) < 0 || views_check_aliasing(&self->s) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

PyDoc_STRVAR(pk_linear_doc,
             "pk_linear(weight, x, y, nthreads)\n--\n\n"
             "y = x W^T for a PackedWeight, with the active kernels; x float32 or bfloat16 (..., cols), y float32 or\n"
             "bfloat16 (..., rows).  x and y go through the exporter set by pk_set_exporter when they are of its type.");

static PyObject *pk_linear(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 4, "pk_linear") < 0) return NULL;
    if (!PyObject_TypeCheck(args[0], &PackedWeightType)) {
        PyErr_Format(PyExc_TypeError, "argument 'weight' must be a sliderquant._C.PackedWeight (from pk_weight), got %s",
                     Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    const PackedWeight *w = (const PackedWeight *)args[0];
    long nthreads;
    if (parse_int(args[3], "nthreads", 1, 4096, &nthreads) < 0) return NULL;
    module_state *st = get_state(module);
    sq_pk_params p = {0};
    p.rows = w->g.rows;
    p.cols = w->g.cols;
    p.group = w->g.group;
    p.bits = (int)w->g.bits;
    p.nthreads = (int)nthreads;
    view_set s = {0};
    PyObject *res = NULL;
    view *x, *y;
    if (pk_add_xy(&s, args[1], args[2], &w->g, &p, st, &x, &y) < 0) goto done;
    if (views_check_aliasing(&s) < 0) goto done;
    for (int k = 0; k < 2; ++k) { /* y must not overlap the weight either */
        if (views_overlap(y, &w->s.v[k])) {
            PyErr_Format(PyExc_ValueError, "output 'y' overlaps the weight's '%s' in memory; outputs must be fresh tensors",
                         w->s.v[k].name);
            goto done;
        }
    }
    res = pk_run(st->pk_matmul, &p, &w->s.v[0], &w->s.v[1], x, y);
done:
    views_release(&s);
    return res;
}

PyDoc_STRVAR(pk_set_exporter_doc,
             "pk_set_exporter(type, export)\n--\n\n"
             "pk_linear exports its x and y arguments of exactly this type by export(obj), which must return a\n"
             "DLPack capsule, instead of obj.__dlpack__(); (None, None) goes back to __dlpack__.  For torch:\n"
             "(torch.Tensor, torch._C._to_dlpack_versioned); the caller then makes __dlpack__'s checks itself.");

static PyObject *pk_set_exporter(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 2, "pk_set_exporter") < 0) return NULL;
    module_state *st = get_state(module);
    if (args[0] == Py_None && args[1] == Py_None) {
        Py_CLEAR(st->fast_type);
        Py_CLEAR(st->fast_export);
        Py_RETURN_NONE;
    }
    if (!PyType_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "pk_set_exporter(type, export) takes a type and a callable, or None, None");
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(st->fast_type, args[0]);
    Py_XSETREF(st->fast_export, args[1]);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ dense bf16 matmul */

PyDoc_STRVAR(dn_linear_doc,
             "dn_linear(w, x, y, nthreads, isa)\n--\n\n"
             "y = x W^T for a dense bfloat16 W (rows, cols), C-contiguous (csrc/sq_dense.h); x float32 or bfloat16\n"
             "(..., cols), y float32 or bfloat16 (..., rows).  x and y go through the exporter of pk_set_exporter\n"
             "when they are of its type.  isa None uses the active kernels, else 'ref', 'avx2' or 'avx512'.");

static PyObject *dn_linear(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (check_nargs(nargs, 5, "dn_linear") < 0) return NULL;
    long nthreads;
    if (parse_int(args[3], "nthreads", 1, 4096, &nthreads) < 0) return NULL;
    module_state *st = get_state(module);
    const char *isa;
    if (parse_isa(args[4], &isa) < 0) return NULL;
    sq_dn_matmul_fn fn = !isa ? st->dn_matmul : strcmp(isa, "auto") ? sq_dn_kernel(isa, NULL) : NULL;
    if (!fn) return isa_unavailable("dense", isa);
    view_set s = {0};
    PyObject *res = NULL;
    view *w = views_add(&s, args[0], "w", 0, 0);
    if (!w) goto done;
    if (w->t->dtype.code != SQ_kDLBfloat || w->t->dtype.bits != 16) {
        PyErr_Format(PyExc_TypeError, "argument 'w' must be bfloat16, got %s", dtype_name(w->t->dtype));
        goto done;
    }
    if (w->t->ndim != 2 || w->t->shape[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "argument 'w' must be 2-D (out_features, in_features) with in_features >= 1");
        goto done;
    }
    pk_shape g = {.rows = (long)w->t->shape[0], .cols = (long)w->t->shape[1]};
    sq_pk_params pp = {0};
    view *x, *y;
    if (pk_add_xy(&s, args[1], args[2], &g, &pp, st, &x, &y) < 0) goto done;
    if (views_check_aliasing(&s) < 0) goto done;
    sq_dn_params p = {.tokens = pp.tokens, .rows = g.rows, .cols = g.cols, .nthreads = (int)nthreads,
                      .x_dtype = pp.x_dtype, .y_dtype = pp.y_dtype};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = fn(&p, (const uint16_t *)w->data, x->data, y->data);
    Py_END_ALLOW_THREADS
    res = run_status(status, "the dense matmul");
done:
    views_release(&s);
    return res;
}

static PyObject *packed_backend(PyObject *module, PyObject *unused) {
    return PyUnicode_FromString(get_state(module)->pk_name);
}

/* ------------------------------------------------------------------ backend selection */

static PyObject *backend(PyObject *module, PyObject *unused) {
    return PyUnicode_FromString(get_state(module)->kernels->name);
}

static PyObject *set_backend(PyObject *module, PyObject *name_obj) {
    const char *name = PyUnicode_AsUTF8(name_obj);
    if (!name) return NULL;
    const sq_kernel_table *t = NULL;
    /* the packed kernels follow: ref -> ref, avx2 -> avx2, auto -> the best (AVX-512 where present);
     * 'avx512' selects the avx2 table for everything else */
    const char *pk_isa = strcmp(name, "avx512") == 0 ? "avx512" : name;
    if (strcmp(name, "avx512") == 0) {
        t = sq_kernels_avx2();
        if (!t || !sq_pk_kernel("avx512", NULL)) {
            PyErr_SetString(PyExc_RuntimeError, "this CPU does not support AVX-512F, AVX2 and FMA");
            return NULL;
        }
    } else if (strcmp(name, "ref") == 0) {
        t = sq_kernels_ref();
    } else if (strcmp(name, "avx2") == 0) {
        t = sq_kernels_avx2();
        if (!t) {
            PyErr_SetString(PyExc_RuntimeError, "this CPU does not support AVX2 and FMA");
            return NULL;
        }
    } else if (strcmp(name, "auto") == 0) {
        t = sq_kernels_best();
    } else {
        PyErr_Format(PyExc_ValueError,
                     "unknown ISA '%s' (expected 'ref', 'avx2', 'avx512' or 'auto'; SLIDERQUANT_ISA also accepts 'torch')", name);
        return NULL;
    }
    module_state *st = get_state(module);
    st->kernels = t;
    st->pk_matmul = sq_pk_kernel(pk_isa, &st->pk_name);
    st->dn_matmul = sq_dn_kernel(pk_isa, &st->dn_name);
    Py_RETURN_NONE;
}

static PyObject *have_openmp(PyObject *module, PyObject *unused) { return PyBool_FromLong(sq_have_openmp()); }

static PyObject *max_threads(PyObject *module, PyObject *unused) { return PyLong_FromLong(sq_max_threads()); }

static PyObject *avx2_supported(PyObject *module, PyObject *unused) {
    return PyBool_FromLong(sq_kernels_avx2() != NULL);
}

static PyObject *native_bf16(PyObject *module, PyObject *unused) { return PyBool_FromLong(sq_native_bf16()); }

static PyMethodDef module_methods[] = {
    {"wq_forward", (PyCFunction)(void (*)(void))wq_forward, METH_FASTCALL, wq_forward_doc},
    {"wq_backward", (PyCFunction)(void (*)(void))wq_backward, METH_FASTCALL, wq_backward_doc},
    {"aq_forward", (PyCFunction)(void (*)(void))aq_forward, METH_FASTCALL, aq_forward_doc},
    {"aq_backward", (PyCFunction)(void (*)(void))aq_backward, METH_FASTCALL, aq_backward_doc},
    {"backend", backend, METH_NOARGS, "backend()\n--\n\nName of the active kernel table: 'avx2' or 'ref'."},
    {"set_backend", set_backend, METH_O, "set_backend(name)\n--\n\nSelect 'ref', 'avx2' or 'auto'."},
    {"have_openmp", have_openmp, METH_NOARGS, "have_openmp()\n--\n\nWhether the extension was built with OpenMP."},
    {"max_threads", max_threads, METH_NOARGS, "max_threads()\n--\n\nOpenMP's default thread count."},
    {"avx2_supported", avx2_supported, METH_NOARGS, "avx2_supported()\n--\n\nWhether this CPU has AVX2 and FMA."},
    {"native_bf16", native_bf16, METH_NOARGS,
     "native_bf16()\n--\n\nWhether this CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16)."},
    {"pk_matmul", (PyCFunction)(void (*)(void))pk_matmul, METH_FASTCALL, pk_matmul_doc},
    {"pk_weight", (PyCFunction)(void (*)(void))pk_weight, METH_FASTCALL, pk_weight_doc},
    {"pk_linear", (PyCFunction)(void (*)(void))pk_linear, METH_FASTCALL, pk_linear_doc},
    {"pk_set_exporter", (PyCFunction)(void (*)(void))pk_set_exporter, METH_FASTCALL, pk_set_exporter_doc},
    {"dn_linear", (PyCFunction)(void (*)(void))dn_linear, METH_FASTCALL, dn_linear_doc},
    {"packed_backend", packed_backend, METH_NOARGS,
     "packed_backend()\n--\n\nName of the active packed matmul kernels: 'avx512', 'avx2' or 'ref'."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module) {
    module_state *st = get_state(module);
    st->kernels = sq_kernels_best();
    st->pk_matmul = sq_pk_kernel("auto", &st->pk_name);
    st->dn_matmul = sq_dn_kernel("auto", &st->dn_name);
    const char *isa = getenv("SLIDERQUANT_ISA");
    /* 'torch' tells sliderquant.ops not to call these kernels at all; the table stays the best one */
    if (isa && *isa && strcmp(isa, "torch") != 0) {
        PyObject *name = PyUnicode_FromString(isa);
        if (!name) return -1;
        PyObject *r = set_backend(module, name);
        Py_DECREF(name);
        if (!r) return -1;
        Py_DECREF(r);
    }
    if (PyType_Ready(&PackedWeightType) < 0) return -1;
    if (PyModule_AddObjectRef(module, "PackedWeight", (PyObject *)&PackedWeightType) < 0) return -1;
    if (PyModule_AddIntConstant(module, "DLPACK_MAJOR", SQ_DLPACK_MAJOR) < 0) return -1;
    if (PyModule_AddIntConstant(module, "MAX_RANK", SQ_MAX_RANK) < 0) return -1;
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static int module_traverse(PyObject *module, visitproc visit, void *arg) {
    module_state *st = get_state(module);
    Py_VISIT(st->fast_type);
    Py_VISIT(st->fast_export);
    return 0;
}

static int module_clear(PyObject *module) {
    module_state *st = get_state(module);
    Py_CLEAR(st->fast_type);
    Py_CLEAR(st->fast_export);
    return 0;
}

static void module_free(void *module) { module_clear((PyObject *)module); }

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sliderquant._C",
    .m_doc = "sliderquant's C kernels: fused fake quantization (forward and backward) over DLPack tensors.",
    .m_size = sizeof(module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
