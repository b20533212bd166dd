// The DLPack C ABI (https://dmlc.github.io/dlpack/latest/c_api.html), declared here for the few
// structs the binding reads and writes: a framework-neutral description of a tensor (pointer,
// device, dtype, shape, strides in elements) that torch and numpy export and import in O(1),
// far cheaper than building a numpy array per call. Legacy (unversioned) capsules only: that is
// what torch.utils.dlpack.to_dlpack produces and from_dlpack accepts from torch 2.4 on.
#pragma once
#include <cstdint>

namespace sparsenet::dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

// The capsule name of the exchange protocol; a consumer that takes ownership renames the capsule
// ("used_dltensor"), so a capsule still carrying this name has not been consumed.
constexpr const char* kCapsuleName = "dltensor";

}  // namespace sparsenet::dlpack
