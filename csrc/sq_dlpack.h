/*
 * sq_dlpack.h: the parts of the DLPack ABI that sliderquant consumes.
 *
 * Written from the DLPack specification (https://dmlc.github.io/dlpack/latest/c_api.html and the
 * Python data-interchange protocol of the array API standard).  Only layouts and constants are
 * declared here; the struct layouts must match the ABI exactly, hence the static asserts.
 *
 * Two capsule kinds exist:
 *   "dltensor"           -> DLManagedTensor*           (legacy, DLPack < 1.0)
 *   "dltensor_versioned" -> DLManagedTensorVersioned*  (DLPack >= 1.0, has version and flags)
 * A consumer that takes ownership renames the capsule to "used_dltensor" /
 * "used_dltensor_versioned" and later calls the managed tensor's deleter.
 */
#ifndef SQ_DLPACK_H
#define SQ_DLPACK_H

#include <stddef.h>
#include <stdint.h>

#define SQ_DLPACK_MAJOR 1
#define SQ_DLPACK_MINOR 0

/* DLDeviceType */
enum {
    SQ_kDLCPU = 1,
    SQ_kDLCUDA = 2,
    SQ_kDLCUDAHost = 3,
};

/* DLDataTypeCode */
enum {
    SQ_kDLInt = 0,
    SQ_kDLUInt = 1,
    SQ_kDLFloat = 2,
    SQ_kDLOpaqueHandle = 3,
    SQ_kDLBfloat = 4,
    SQ_kDLComplex = 5,
    SQ_kDLBool = 6,
};

/* Flags of DLManagedTensorVersioned */
#define SQ_DLPACK_FLAG_READ_ONLY (UINT64_C(1) << 0)
#define SQ_DLPACK_FLAG_IS_COPIED (UINT64_C(1) << 1)

typedef struct {
    uint32_t major;
    uint32_t minor;
} SQ_DLPackVersion;

typedef struct {
    int32_t device_type;
    int32_t device_id;
} SQ_DLDevice;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} SQ_DLDataType;

typedef struct {
    void *data;
    SQ_DLDevice device;
    int32_t ndim;
    SQ_DLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} SQ_DLTensor;

typedef struct SQ_DLManagedTensor {
    SQ_DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct SQ_DLManagedTensor *self);
} SQ_DLManagedTensor;

typedef struct SQ_DLManagedTensorVersioned {
    SQ_DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct SQ_DLManagedTensorVersioned *self);
    uint64_t flags;
    SQ_DLTensor dl_tensor;
} SQ_DLManagedTensorVersioned;

_Static_assert(sizeof(SQ_DLDevice) == 8, "DLDevice is two int32");
_Static_assert(sizeof(SQ_DLDataType) == 4, "DLDataType is packed in 4 bytes");
_Static_assert(offsetof(SQ_DLTensor, ndim) == 16, "DLTensor.ndim offset");
_Static_assert(offsetof(SQ_DLTensor, shape) == 24, "DLTensor.shape offset");
_Static_assert(sizeof(SQ_DLTensor) == 48, "DLTensor size (64-bit ABI)");
_Static_assert(offsetof(SQ_DLManagedTensor, deleter) == 56, "DLManagedTensor.deleter offset");
_Static_assert(offsetof(SQ_DLManagedTensorVersioned, flags) == 24, "DLManagedTensorVersioned.flags");
_Static_assert(offsetof(SQ_DLManagedTensorVersioned, dl_tensor) == 32, "DLManagedTensorVersioned.dl_tensor");

#endif /* SQ_DLPACK_H */
