// onnxruntime custom-op library: vlsparse.SparseLinear (CPU, fp32) and vlsparse.SparseLinearInt8 (CPU, int8
// weights in 1x4 blocks, activations quantised per token: spmm_int8.h; its inputs are documented at its kernel
// class below). What follows describes SparseLinear; the threads and the ABI notes hold for both.
//
//   Y = X @ W^T + bias, with W (out_features x in_features) stored in CSR by output row.
//
// Inputs
//   0  X             float  (..., in_features)   any rank >= 1; all leading dims are flattened into tokens;
//                           (in_features, ...) with input_layout = 1 (feature-major: X moved its last
//                           axis to the front, the tokens are the trailing dims)
//   1  crow_indices  int32  (out_features + 1,)  crow[0] == 0, crow[out] == nnz, non-decreasing
//   2  col_indices   int16 or int32 (nnz,)       column of each nonzero, in [0, in_features)
//   3  values        float  (nnz,)
//   4  bias          float  (out_features,)      OPTIONAL (omit it, or pass the empty name "")
// Output
//   0  Y             float  (..., out_features), or (out_features, ...) with output_layout = 1; the
//                           leading (token) dims "..." are X's
// Attributes (all optional, int): in_features, out_features: when present they are checked against
// X's last dimension and len(crow_indices) - 1 (the sizes themselves are always taken from the
// inputs); activation: 0 (default) none, 1 GELU (erf form) applied to X @ W^T + bias in the kernel's
// epilogue (Y = gelu(X @ W^T + bias), the BERT intermediate Linear + its activation in one node);
// input_layout, output_layout: 0 (default) token-major, 1 feature-major. Feature-major tensors let
// consecutive ops chain without transposes (the kernel computes feature-major: a token-major X is
// transposed into a scratch buffer, a token-major Y is transposed from the result tiles on the way
// out; feature-major X and Y skip those steps).
//
// Two kernels share the op name, one for int16 and one for int32 col_indices (ORT overloads by type).
// The compute is vlsparse::spmm_f32<ColT> from spmm.h. Threads: on onnxruntime >= 1.17 the op runs on
// onnxruntime's own intra-op thread pool (OrtApi::KernelContext_ParallelFor; its size is the session's
// intra_op_num_threads), so no second pool competes with onnxruntime's threads for the cores. On older
// runtimes, or after vlsparse_ort_set_openmp(1), it runs in an OpenMP region whose thread count is set
// with vlsparse_ort_set_num_threads(n) (process-wide) or VLSPARSE_NUM_THREADS, else OMP_NUM_THREADS.
//
// No onnxruntime header ships on PyPI or Debian, so the part of the ORT C ABI used here is declared
// below. The OrtApi table is append-only and ABI-stable: entries are declared at their index in
// onnxruntime_c_api.h and unused entries are padded with void*; static_asserts pin every offset.
// OrtCustomOp is declared in its full current layout (25 function pointers after `version`); we set
// version = 16 so ORT reads fields up to KernelComputeV2 (CreateKernelV2 / KernelComputeV2 are used,
// so errors come back to ORT as OrtStatus instead of aborting the process) and ignores the rest.
// Checked against onnxruntime's sources: OrtApi indices 0..99 as counted in onnxruntime_c_api.h of
// API 13 (the table only ever grows at its end), KernelContext_ParallelFor at 274 (API 17; read only
// when GetApi(17) answers), the OrtCustomOp layout of API 30, and the gates in
// onnxruntime/core/session/custom_ops.cc (>= 8 optional inputs, >= 13 GetInputMemoryType, >= 14
// variadic, >= 16 CreateKernelV2/KernelComputeV2, >= 17 GetStartVersion/InferOutputShapeFn). An old
// version-4-sized struct makes ORT call a NULL GetInputCharacteristic at session creation.
// Runs with onnxruntime >= 1.16 (its own thread pool from 1.17); tested with 1.31.1 and 1.32.0.

#include <omp.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "spmm.h"
#include "spmm_int8.h"

#define VLS_EXPORT extern "C" __attribute__((visibility("default")))

// ------------------------------------------------------------------------------------------------
// ORT C ABI subset (names as in onnxruntime_c_api.h)
// ------------------------------------------------------------------------------------------------
extern "C" {

struct OrtStatus;
struct OrtValue;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtTensorTypeAndShapeInfo;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtShapeInferContext;

typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16 = 5,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
} ONNXTensorElementDataType;

typedef enum OrtErrorCode {
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
  ORT_RUNTIME_EXCEPTION = 6,
} OrtErrorCode;

typedef enum OrtMemType {
  OrtMemTypeCPUInput = -2,
  OrtMemTypeCPUOutput = -1,
  OrtMemTypeDefault = 0,
} OrtMemType;

typedef enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
} OrtCustomOpInputOutputCharacteristic;

struct OrtApi;

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version) noexcept;
  const char* (*GetVersionString)() noexcept;
};

// Index in the comment = position in OrtApi (0-based). Padding arrays cover the entries in between.
struct OrtApi {
  OrtStatus* (*CreateStatus)(OrtErrorCode code, const char* msg) noexcept;  // 0
  OrtErrorCode (*GetErrorCode)(const OrtStatus* status) noexcept;           // 1
  const char* (*GetErrorMessage)(const OrtStatus* status) noexcept;         // 2
  void* unused_3_25[23];                                                    // 3 CreateEnv .. 25 SetInterOpNumThreads
  OrtStatus* (*CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out) noexcept;  // 26
  OrtStatus* (*CustomOpDomain_Add)(OrtCustomOpDomain* domain, const struct OrtCustomOp* op) noexcept;  // 27
  OrtStatus* (*AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain) noexcept;  // 28
  void* unused_29_50[22];  // 29 RegisterCustomOpsLibrary .. 50 IsTensor
  OrtStatus* (*GetTensorMutableData)(OrtValue* value, void** out) noexcept;  // 51
  void* unused_52_59[8];  // 52 FillStringTensor .. 59 SetDimensions
  OrtStatus* (*GetTensorElementType)(const OrtTensorTypeAndShapeInfo* info,
                                     ONNXTensorElementDataType* out) noexcept;  // 60
  OrtStatus* (*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out) noexcept;  // 61
  OrtStatus* (*GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dim_values,
                              size_t dim_values_length) noexcept;  // 62
  void* unused_63_64[2];  // 63 GetSymbolicDimensions, 64 GetTensorShapeElementCount
  OrtStatus* (*GetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out) noexcept;  // 65
  void* unused_66_85[20];  // 66 GetTypeInfo .. 85 KernelInfoGetAttribute_float
  OrtStatus* (*KernelInfoGetAttribute_int64)(const OrtKernelInfo* info, const char* name,
                                             int64_t* out) noexcept;  // 86
  void* unused_87[1];  // 87 KernelInfoGetAttribute_string
  OrtStatus* (*KernelContext_GetInputCount)(const OrtKernelContext* context, size_t* out) noexcept;  // 88
  OrtStatus* (*KernelContext_GetOutputCount)(const OrtKernelContext* context, size_t* out) noexcept;  // 89
  OrtStatus* (*KernelContext_GetInput)(const OrtKernelContext* context, size_t index,
                                       const OrtValue** out) noexcept;  // 90
  OrtStatus* (*KernelContext_GetOutput)(OrtKernelContext* context, size_t index, const int64_t* dim_values,
                                        size_t dim_count, OrtValue** out) noexcept;  // 91
  void* unused_92[1];                                                    // 92 ReleaseEnv
  void (*ReleaseStatus)(OrtStatus* input) noexcept;                      // 93
  void* unused_94_98[5];  // 94 ReleaseMemoryInfo .. 98 ReleaseTypeInfo
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* input) noexcept;  // 99
  void* unused_100_273[174];  // 100 ReleaseSessionOptions .. 273 SetDeterministicCompute
  OrtStatus* (*KernelContext_ParallelFor)(const OrtKernelContext* context, void (*fn)(void*, size_t), size_t total,
                                          size_t num_batch, void* usr_data) noexcept;  // 274, API >= 17
};

#define VLS_API_SLOT(field, index) \
  static_assert(offsetof(OrtApi, field) == (index) * sizeof(void*), "OrtApi::" #field " is not at index " #index)
VLS_API_SLOT(CreateStatus, 0);
VLS_API_SLOT(GetErrorCode, 1);
VLS_API_SLOT(GetErrorMessage, 2);
VLS_API_SLOT(CreateCustomOpDomain, 26);
VLS_API_SLOT(CustomOpDomain_Add, 27);
VLS_API_SLOT(AddCustomOpDomain, 28);
VLS_API_SLOT(GetTensorMutableData, 51);
VLS_API_SLOT(GetTensorElementType, 60);
VLS_API_SLOT(GetDimensionsCount, 61);
VLS_API_SLOT(GetDimensions, 62);
VLS_API_SLOT(GetTensorTypeAndShape, 65);
VLS_API_SLOT(KernelInfoGetAttribute_int64, 86);
VLS_API_SLOT(KernelContext_GetInputCount, 88);
VLS_API_SLOT(KernelContext_GetOutputCount, 89);
VLS_API_SLOT(KernelContext_GetInput, 90);
VLS_API_SLOT(KernelContext_GetOutput, 91);
VLS_API_SLOT(ReleaseStatus, 93);
VLS_API_SLOT(ReleaseTensorTypeAndShapeInfo, 99);
VLS_API_SLOT(KernelContext_ParallelFor, 274);
static_assert(sizeof(OrtApi) == 275 * sizeof(void*), "OrtApi subset must end at index 274");

// Full OrtCustomOp layout (fields through ReleaseAliasMap, as in onnxruntime_c_api.h for API >= 18).
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                               void** kernel);
  OrtStatus* (*KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* ctx);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};
static_assert(offsetof(OrtCustomOp, CreateKernel) == 8, "OrtCustomOp layout");
static_assert(offsetof(OrtCustomOp, GetInputCharacteristic) == 8 + 9 * sizeof(void*), "OrtCustomOp layout");
static_assert(offsetof(OrtCustomOp, CreateKernelV2) == 8 + 16 * sizeof(void*), "OrtCustomOp layout");
static_assert(offsetof(OrtCustomOp, KernelComputeV2) == 8 + 17 * sizeof(void*), "OrtCustomOp layout");
static_assert(sizeof(OrtCustomOp) == 8 + 25 * sizeof(void*), "OrtCustomOp layout");

}  // extern "C"

// ------------------------------------------------------------------------------------------------
// The op
// ------------------------------------------------------------------------------------------------
namespace {

constexpr uint32_t kOpVersion = 16;  // CreateKernelV2 / KernelComputeV2; needs onnxruntime >= 1.16
constexpr uint32_t kParallelForVersion = 17;  // OrtApi::KernelContext_ParallelFor: onnxruntime >= 1.17
constexpr const char* kDomain = "vlsparse";
constexpr const char* kOpName = "SparseLinear";
constexpr const char* kOpNameInt8 = "SparseLinearInt8";

std::atomic<int> g_num_threads{0};  // 0: leave OpenMP's own setting alone
// Which threads run the op: onnxruntime's intra-op pool (KernelContext_ParallelFor, C API >= 17) when
// the runtime has it and nobody asked for OpenMP, else an OpenMP region (the op's second pool).
std::atomic<bool> g_has_parallel_for{false};
std::atomic<bool> g_force_openmp{false};

int env_num_threads() {
  const char* s = std::getenv("VLSPARSE_NUM_THREADS");
  if (!s || !*s) return 0;
  int n = std::atoi(s);
  return n > 0 ? n : 0;
}

struct Error {
  OrtErrorCode code;
  std::string msg;
};

template <typename ColT>
struct ColTraits;
template <>
struct ColTraits<int16_t> {
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16;
  static constexpr const char* kName = "int16";
};
template <>
struct ColTraits<int32_t> {
  static constexpr ONNXTensorElementDataType kType = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  static constexpr const char* kName = "int32";
};

// A tensor input: data pointer, element type and shape.
struct TensorView {
  const void* data = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// The weight buffers (and sizes) a kernel last checked: initializers keep their buffers for the session's lifetime,
// so in steady state the full check is one comparison of these.
struct Checked {
  const void* crow = nullptr;
  const void* col = nullptr;
  const void* values = nullptr;
  int64_t out = -1, in = -1, n = -1;
  bool operator==(const Checked& o) const {
    return crow == o.crow && col == o.col && values == o.values && out == o.out && in == o.in && n == o.n;
  }
};

// The node's int attributes (-1: absent).
struct Attrs {
  int64_t in_features = -1, out_features = -1, activation = -1, input_layout = -1, output_layout = -1;
};

void check_choice(int64_t v, const char* name, const char* what) {
  if (v != -1 && v != 0 && v != 1)
    throw Error{ORT_INVALID_ARGUMENT, std::string("vlsparse.SparseLinear: attribute ") + name + " must be " + what +
                                          ", got " + std::to_string(v)};
}

class Kernel {
 public:
  Kernel(const OrtApi* api, const Attrs& a)
      : api_(api),
        in_attr_(a.in_features),
        out_attr_(a.out_features),
        act_(a.activation == 1 ? vlsparse::Act::Gelu : vlsparse::Act::None),
        x_fm_(a.input_layout == 1),
        y_fm_(a.output_layout == 1),
        env_threads_(env_num_threads()) {
    check_choice(a.activation, "activation", "0 (none) or 1 (gelu)");
    check_choice(a.input_layout, "input_layout", "0 (token-major) or 1 (feature-major)");
    check_choice(a.output_layout, "output_layout", "0 (token-major) or 1 (feature-major)");
  }

  virtual ~Kernel() = default;
  virtual void compute(OrtKernelContext* ctx) = 0;
  const OrtApi* api() const { return api_; }

 protected:
  // Calls run(par) with the parallel-for policy the op runs on: onnxruntime's intra-op pool where the runtime
  // has KernelContext_ParallelFor (and nobody forced OpenMP), else OpenMP with the thread count set by
  // vlsparse_ort_set_num_threads / VLSPARSE_NUM_THREADS (else OpenMP's own).
  template <typename Run>
  void parallel(OrtKernelContext* ctx, const Run& run) const;

  // The checks every op makes against its attributes: X's feature count (in_features), out_features, the bias
  // (float32 (out_features,) when present); errors name the op ``op``.
  void check_sizes(const char* op, const TensorView& x, int64_t in_features, int64_t out_features, bool has_bias,
                   const TensorView& bias) const;

  // Output 0 with ``shape``: its data.
  float* output(OrtKernelContext* ctx, const std::vector<int64_t>& shape) const;

  // Turns an ORT status into an Error (and frees it).
  void check(OrtStatus* st) const {
    if (st == nullptr) return;
    Error e{api_->GetErrorCode(st), api_->GetErrorMessage(st)};
    api_->ReleaseStatus(st);
    throw e;
  }

  // Returns false for an absent optional input.
  bool input(OrtKernelContext* ctx, size_t index, TensorView& out) const {
    size_t count = 0;
    check(api_->KernelContext_GetInputCount(ctx, &count));
    if (index >= count) return false;
    const OrtValue* v = nullptr;
    check(api_->KernelContext_GetInput(ctx, index, &v));
    if (v == nullptr) return false;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    check(api_->GetTensorTypeAndShape(v, &info));
    OrtStatus* st = api_->GetTensorElementType(info, &out.type);
    size_t rank = 0;
    if (!st) st = api_->GetDimensionsCount(info, &rank);
    if (!st) {
      out.shape.assign(rank, 0);
      st = api_->GetDimensions(info, out.shape.data(), rank);
    }
    api_->ReleaseTensorTypeAndShapeInfo(info);
    check(st);
    void* p = nullptr;
    check(api_->GetTensorMutableData(const_cast<OrtValue*>(v), &p));
    out.data = p;
    return true;
  }

  const OrtApi* api_;
  int64_t in_attr_;
  int64_t out_attr_;
  vlsparse::Act act_;
  bool x_fm_;  // X is feature-major (in_features, ...)
  bool y_fm_;  // Y is feature-major (out_features, ...)
  int env_threads_;
};

// spmm.h parallel-for policy on onnxruntime's intra-op thread pool: par(n, f) runs f(0..n-1) through
// KernelContext_ParallelFor (each index a work item, claimed dynamically by the pool's threads and
// the calling thread). f must not throw; an exception that escapes anyway is reported after the loop.
struct OrtFor {
  const OrtApi* api;
  const OrtKernelContext* ctx;

  template <typename F>
  void operator()(int64_t n, const F& f) const {
    if (n <= 0) return;
    if (n == 1) {
      f(0);
      return;
    }
    struct Job {
      const F* f;
      std::atomic<bool> failed{false};
    } job{&f};
    auto run = [](void* data, size_t i) {
      Job* j = static_cast<Job*>(data);
      try {
        (*j->f)(static_cast<int64_t>(i));
      } catch (...) {
        j->failed.store(true);
      }
    };
    OrtStatus* st = api->KernelContext_ParallelFor(ctx, run, static_cast<size_t>(n), 0, &job);
    if (st != nullptr) {
      Error e{api->GetErrorCode(st), std::string("vlsparse.SparseLinear: ParallelFor: ") + api->GetErrorMessage(st)};
      api->ReleaseStatus(st);
      throw e;
    }
    if (job.failed.load()) throw Error{ORT_RUNTIME_EXCEPTION, "vlsparse.SparseLinear: a worker failed (out of memory?)"};
  }
};

template <typename Run>
void Kernel::parallel(OrtKernelContext* ctx, const Run& run) const {
  if (g_has_parallel_for.load(std::memory_order_relaxed) && !g_force_openmp.load(std::memory_order_relaxed)) {
    run(OrtFor{api_, ctx});
    return;
  }
  const int n = g_num_threads.load(std::memory_order_relaxed);
  if (n > 0) {
    omp_set_num_threads(n);
  } else if (env_threads_ > 0) {
    omp_set_num_threads(env_threads_);
  }
  run(vlsparse::OmpFor{});
}

[[noreturn]] void fail_op(const char* op, const std::string& msg) {
  throw Error{ORT_INVALID_ARGUMENT, std::string("vlsparse.") + op + ": " + msg};
}
[[noreturn]] void fail(const std::string& msg) { fail_op(kOpName, msg); }

std::string shape_str(const std::vector<int64_t>& s);

void Kernel::check_sizes(const char* op, const TensorView& x, int64_t in_features, int64_t out_features,
                         bool has_bias, const TensorView& bias) const {
  if (in_attr_ >= 0 && in_attr_ != in_features)
    fail_op(op, "X has " + std::to_string(in_features) + " features in its " + (x_fm_ ? "first" : "last") +
                    " dim, the op expects in_features=" + std::to_string(in_attr_) + " (X shape " + shape_str(x.shape) +
                    ")");
  if (out_attr_ >= 0 && out_attr_ != out_features)
    fail_op(op, "crow_indices gives out_features=" + std::to_string(out_features) + ", attribute says " +
                    std::to_string(out_attr_));
  if (has_bias && (bias.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || bias.shape.size() != 1 ||
                   bias.shape[0] != out_features))
    fail_op(op, "bias must be float32 of shape (" + std::to_string(out_features) + ",), got " + shape_str(bias.shape));
}

float* Kernel::output(OrtKernelContext* ctx, const std::vector<int64_t>& shape) const {
  OrtValue* yv = nullptr;
  check(api_->KernelContext_GetOutput(ctx, 0, shape.data(), shape.size(), &yv));
  void* yp = nullptr;
  check(api_->GetTensorMutableData(yv, &yp));
  return static_cast<float*>(yp);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

template <typename ColT>
class SparseLinearKernel final : public Kernel {
 public:
  using Kernel::Kernel;

  void compute(OrtKernelContext* ctx) override {
    TensorView x, crow, col, val, bias;
    if (!input(ctx, 0, x) || !input(ctx, 1, crow) || !input(ctx, 2, col) || !input(ctx, 3, val))
      fail("inputs X, crow_indices, col_indices and values are required");
    const bool has_bias = input(ctx, 4, bias);

    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail("X must be float32");
    if (x.shape.empty()) fail("X must have rank >= 1, got a scalar");
    if (crow.shape.size() != 1 || crow.shape[0] < 1) fail("crow_indices must be 1-D with out_features + 1 entries");
    if (col.shape.size() != 1 || val.shape.size() != 1 || col.shape[0] != val.shape[0])
      fail("col_indices and values must be 1-D of the same length, got " + shape_str(col.shape) + " and " +
           shape_str(val.shape));

    const int64_t in_features = x_fm_ ? x.shape.front() : x.shape.back();
    const int64_t out_features = crow.shape[0] - 1;
    const int64_t nnz = val.shape[0];
    // the token dims: all but X's feature axis (the last one, or the first when feature-major)
    const std::vector<int64_t> lead(x.shape.begin() + (x_fm_ ? 1 : 0), x.shape.end() - (x_fm_ ? 0 : 1));
    int64_t tokens = 1;
    for (int64_t d : lead) tokens *= d;

    check_sizes(kOpName, x, in_features, out_features, has_bias, bias);

    const auto* crow_p = static_cast<const int32_t*>(crow.data);
    const auto* col_p = static_cast<const ColT*>(col.data);
    validate(crow_p, col_p, out_features, in_features, nnz);

    std::vector<int64_t> yshape(lead);
    yshape.insert(y_fm_ ? yshape.begin() : yshape.end(), out_features);
    float* y = output(ctx, yshape);
    if (tokens == 0 || out_features == 0) return;

    const auto* xp = static_cast<const float*>(x.data);
    const auto* vp = static_cast<const float*>(val.data);
    const float* bp = has_bias ? static_cast<const float*>(bias.data) : nullptr;
    parallel(ctx, [&](const auto& par) { run(xp, tokens, in_features, crow_p, col_p, vp, bp, out_features, y, par); });
  }

 private:
  // The spmm.h entry for this node's layouts (feature-major tensors have row stride = tokens).
  template <typename Par>
  void run(const float* x, int64_t tokens, int64_t in_f, const int32_t* crow, const ColT* col, const float* val,
           const float* bias, int64_t out_f, float* y, const Par& par) const {
    if (x_fm_ && y_fm_)
      vlsparse::spmm_f32_fm<ColT>(x, tokens, in_f, tokens, crow, col, val, bias, out_f, y, tokens, act_, par);
    else if (x_fm_)
      vlsparse::spmm_f32_fm_rm<ColT>(x, tokens, in_f, tokens, crow, col, val, bias, out_f, y, act_, par);
    else if (y_fm_)
      vlsparse::spmm_f32_rm_fm<ColT>(x, tokens, in_f, crow, col, val, bias, out_f, y, tokens, act_, par);
    else
      vlsparse::spmm_f32<ColT>(x, tokens, in_f, crow, col, val, bias, out_f, y, act_, par);
  }

  // Full CSR check: O(out + nnz), done once per distinct (crow, col) buffer pair. Initializers keep
  // their buffers for the session's lifetime, so in steady state this is a pointer comparison.
  void validate(const int32_t* crow, const ColT* col, int64_t out_features, int64_t in_features, int64_t nnz) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (checked_ == Checked{crow, col, nullptr, out_features, in_features, nnz}) return;
    }
    if (crow[0] != 0) fail("crow_indices[0] must be 0, got " + std::to_string(crow[0]));
    if (static_cast<int64_t>(crow[out_features]) != nnz)
      fail("crow_indices[-1] = " + std::to_string(crow[out_features]) + " but there are " + std::to_string(nnz) +
           " values");
    for (int64_t o = 0; o < out_features; ++o)
      if (crow[o + 1] < crow[o]) fail("crow_indices must be non-decreasing (row " + std::to_string(o) + ")");
    for (int64_t k = 0; k < nnz; ++k) {
      const int64_t c = static_cast<int64_t>(col[k]);
      if (c < 0 || c >= in_features)
        fail("col_indices[" + std::to_string(k) + "] = " + std::to_string(c) + " is outside [0, " +
             std::to_string(in_features) + ")");
    }
    std::lock_guard<std::mutex> lock(mu_);
    checked_ = Checked{crow, col, nullptr, out_features, in_features, nnz};
  }

  std::mutex mu_;
  Checked checked_;
};

// vlsparse.SparseLinearInt8: Y = act(dequant(Xq Wq^T) + bias), the int8 kernel of spmm_int8.h (its header gives
// the quantisation: weights symmetric int8 per output row, X quantised per token at run time, int32
// accumulation). Token-major X and Y only.
//   0  X             float  (..., in_features)
//   1  crow_indices  int32  (out_features + 1,)  CSR over 1x4 blocks (4 consecutive inputs of one row)
//   2  block_cols    int16 or int32 (nblocks,)   input // 4 of each block, in [0, ceil(in_features / 4))
//   3  values        int8   (nblocks * 4,)       the blocks' weights, row-major
//   4  scales        float  (out_features,)      w ~ scales[o] * values
//   5  bias          float  (out_features,)      OPTIONAL
// The row sums of the int8 weights (the zero-point correction) are computed once per weight buffer.
template <typename ColT>
class SparseLinearInt8Kernel final : public Kernel {
 public:
  SparseLinearInt8Kernel(const OrtApi* api, const Attrs& a) : Kernel(api, a) {
    if (x_fm_ || y_fm_) fail8("input_layout and output_layout must be 0 (token-major): the int8 op has no feature-major path");
  }

  void compute(OrtKernelContext* ctx) override {
    TensorView x, crow, col, val, sc, bias;
    if (!input(ctx, 0, x) || !input(ctx, 1, crow) || !input(ctx, 2, col) || !input(ctx, 3, val) || !input(ctx, 4, sc))
      fail8("inputs X, crow_indices, block_cols, values and scales are required");
    const bool has_bias = input(ctx, 5, bias);
    if (x.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) fail8("X must be float32");
    if (x.shape.empty()) fail8("X must have rank >= 1, got a scalar");
    if (crow.shape.size() != 1 || crow.shape[0] < 1) fail8("crow_indices must be 1-D with out_features + 1 entries");
    const int64_t in_features = x.shape.back(), out_features = crow.shape[0] - 1;
    if (col.shape.size() != 1 || val.shape.size() != 1 || val.shape[0] != 4 * col.shape[0])
      fail8("values must hold 4 int8 weights per block: block_cols " + shape_str(col.shape) + ", values " +
            shape_str(val.shape));
    if (sc.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || sc.shape.size() != 1 || sc.shape[0] != out_features)
      fail8("scales must be float32 of shape (" + std::to_string(out_features) + ",), got " + shape_str(sc.shape));
    check_sizes(kOpNameInt8, x, in_features, out_features, has_bias, bias);
    const std::vector<int64_t> lead(x.shape.begin(), x.shape.end() - 1);
    int64_t tokens = 1;
    for (int64_t d : lead) tokens *= d;

    const auto* crow_p = static_cast<const int32_t*>(crow.data);
    const auto* col_p = static_cast<const ColT*>(col.data);
    const auto* wq = static_cast<const int8_t*>(val.data);
    const std::shared_ptr<const std::vector<int32_t>> wsum = validate(crow_p, col_p, wq, out_features, in_features,
                                                                      col.shape[0]);

    std::vector<int64_t> yshape(lead);
    yshape.push_back(out_features);
    float* y = output(ctx, yshape);
    if (tokens == 0 || out_features == 0) return;
    const auto* xp = static_cast<const float*>(x.data);
    const auto* sw = static_cast<const float*>(sc.data);
    const float* bp = has_bias ? static_cast<const float*>(bias.data) : nullptr;
    parallel(ctx, [&](const auto& par) {
      vlsparse::int8::spmm_int8<ColT>(xp, tokens, in_features, crow_p, col_p, wq, sw, wsum->data(), bp, out_features, y,
                                      nullptr, act_, -1, par);
    });
  }

 private:
  [[noreturn]] static void fail8(const std::string& msg) { fail_op(kOpNameInt8, msg); }

  // Full check of the block CSR, O(out + nblocks), and the row sums of the int8 weights; done once per distinct
  // set of buffers (initializers keep theirs for the session's lifetime). Returns the row sums (shared, so that a
  // concurrent call with other buffers cannot free them under a running call).
  std::shared_ptr<const std::vector<int32_t>> validate(const int32_t* crow, const ColT* col, const int8_t* wq, int64_t out_features,
                          int64_t in_features, int64_t nblocks) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (checked_ == Checked{crow, col, wq, out_features, in_features, nblocks}) return wsum_;
    }
    if (crow[0] != 0) fail8("crow_indices[0] must be 0, got " + std::to_string(crow[0]));
    if (static_cast<int64_t>(crow[out_features]) != nblocks)
      fail8("crow_indices[-1] = " + std::to_string(crow[out_features]) + " but there are " + std::to_string(nblocks) +
            " blocks");
    const int64_t kb = (in_features + 3) / 4;
    auto wsum = std::make_shared<std::vector<int32_t>>(static_cast<size_t>(out_features), 0);
    for (int64_t o = 0; o < out_features; ++o) {
      if (crow[o + 1] < crow[o]) fail8("crow_indices must be non-decreasing (row " + std::to_string(o) + ")");
      for (int64_t b = crow[o]; b < crow[o + 1]; ++b) {
        const int64_t c = static_cast<int64_t>(col[b]);
        if (c < 0 || c >= kb)
          fail8("block_cols[" + std::to_string(b) + "] = " + std::to_string(c) + " is outside [0, " +
                std::to_string(kb) + ") (in_features " + std::to_string(in_features) + " in blocks of 4)");
        for (int j = 0; j < 4; ++j) (*wsum)[o] += wq[4 * b + j];
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    wsum_ = wsum;
    checked_ = Checked{crow, col, wq, out_features, in_features, nblocks};
    return wsum;
  }

  std::mutex mu_;
  std::shared_ptr<const std::vector<int32_t>> wsum_;
  Checked checked_;
};

// ---- OrtCustomOp callbacks ----------------------------------------------------------------------

struct OpDef {
  OrtCustomOp op;  // first member: ORT hands the OrtCustomOp* back to us
  const char* name;
  size_t n_inputs;  // the last one is the optional bias
  ONNXTensorElementDataType input_types[8];
  Kernel* (*make)(const OrtApi*, const Attrs&);
};

const OpDef& def_of(const OrtCustomOp* op) { return *reinterpret_cast<const OpDef*>(op); }

int64_t optional_int_attr(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  int64_t v = -1;
  OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {  // absent attribute
    api->ReleaseStatus(st);
    return -1;
  }
  return v;
}

OrtStatus* create_kernel_v2(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel) {
  *kernel = nullptr;
  try {
    const OpDef* def = &def_of(op);
    Attrs a;
    a.in_features = optional_int_attr(api, info, "in_features");
    a.out_features = optional_int_attr(api, info, "out_features");
    a.activation = optional_int_attr(api, info, "activation");
    a.input_layout = optional_int_attr(api, info, "input_layout");
    a.output_layout = optional_int_attr(api, info, "output_layout");
    *kernel = def->make(api, a);
    return nullptr;
  } catch (const Error& e) {
    return api->CreateStatus(e.code, e.msg.c_str());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

void* create_kernel_v1(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
  void* k = nullptr;
  OrtStatus* st = create_kernel_v2(op, api, info, &k);
  if (st) api->ReleaseStatus(st);
  return k;
}

OrtStatus* compute_v2(void* kernel, OrtKernelContext* ctx) {
  Kernel* k = static_cast<Kernel*>(kernel);
  try {
    k->compute(ctx);
    return nullptr;
  } catch (const Error& e) {
    return k->api()->CreateStatus(e.code, e.msg.c_str());
  } catch (const std::exception& e) {
    return k->api()->CreateStatus(ORT_RUNTIME_EXCEPTION, (std::string("vlsparse.SparseLinear: ") + e.what()).c_str());
  } catch (...) {
    return k->api()->CreateStatus(ORT_RUNTIME_EXCEPTION, "vlsparse.SparseLinear: unknown exception");
  }
}

// Only reached by an ORT that ignores KernelComputeV2 (it never is for version >= 16); an error here
// cannot be reported, so it aborts rather than return garbage.
void compute_v1(void* kernel, OrtKernelContext* ctx) {
  Kernel* k = static_cast<Kernel*>(kernel);
  OrtStatus* st = compute_v2(kernel, ctx);
  if (st) {
    std::fprintf(stderr, "%s\n", k->api()->GetErrorMessage(st));
    std::abort();
  }
}

void destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* op_name(const OrtCustomOp* op) { return def_of(op).name; }
const char* op_ep(const OrtCustomOp*) { return nullptr; }  // nullptr: CPU execution provider
size_t op_input_count(const OrtCustomOp* op) { return def_of(op).n_inputs; }
size_t op_output_count(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType op_input_type(const OrtCustomOp* op, size_t index) {
  return index < def_of(op).n_inputs ? def_of(op).input_types[index] : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
ONNXTensorElementDataType op_output_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
OrtCustomOpInputOutputCharacteristic op_input_char(const OrtCustomOp* op, size_t index) {
  return index + 1 == def_of(op).n_inputs ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;  // the bias
}
OrtCustomOpInputOutputCharacteristic op_output_char(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType op_input_mem(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int op_one(const OrtCustomOp*) { return 1; }

template <typename K>
Kernel* make_kernel(const OrtApi* api, const Attrs& a) {
  return new K(api, a);
}

// One registered (op name, column index type) pair: its input types in order (the last is the optional bias).
template <typename K>
OpDef make_def(const char* name, std::initializer_list<ONNXTensorElementDataType> inputs) {
  OpDef d{};  // zero: every field not set below (InferOutputShapeFn, versions, in-place maps) is NULL
  OrtCustomOp& op = d.op;
  op.version = kOpVersion;
  op.CreateKernel = create_kernel_v1;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_ep;
  op.GetInputType = op_input_type;
  op.GetInputTypeCount = op_input_count;
  op.GetOutputType = op_output_type;
  op.GetOutputTypeCount = op_output_count;
  op.KernelCompute = compute_v1;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = op_input_char;
  op.GetOutputCharacteristic = op_output_char;
  op.GetInputMemoryType = op_input_mem;
  op.GetVariadicInputMinArity = op_one;
  op.GetVariadicInputHomogeneity = op_one;
  op.GetVariadicOutputMinArity = op_one;
  op.GetVariadicOutputHomogeneity = op_one;
  op.CreateKernelV2 = create_kernel_v2;
  op.KernelComputeV2 = compute_v2;
  d.name = name;
  d.n_inputs = 0;
  for (ONNXTensorElementDataType t : inputs) d.input_types[d.n_inputs++] = t;
  d.make = make_kernel<K>;
  return d;
}

constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kI32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
constexpr ONNXTensorElementDataType kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;

// X, crow_indices, col_indices, values, bias
template <typename ColT>
OpDef fp32_def() {
  return make_def<SparseLinearKernel<ColT>>(kOpName, {kF32, kI32, ColTraits<ColT>::kType, kF32, kF32});
}
// X, crow_indices, block_cols, values (int8), scales, bias
template <typename ColT>
OpDef int8_def() {
  return make_def<SparseLinearInt8Kernel<ColT>>(kOpNameInt8, {kF32, kI32, ColTraits<ColT>::kType, kI8, kF32, kF32});
}

// Must outlive every session that uses them: static storage, never freed.
OpDef g_op_i16 = fp32_def<int16_t>();
OpDef g_op_i32 = fp32_def<int32_t>();
OpDef g_op_int8_i16 = int8_def<int16_t>();
OpDef g_op_int8_i32 = int8_def<int32_t>();

}  // namespace

// ------------------------------------------------------------------------------------------------
// Exported entry points
// ------------------------------------------------------------------------------------------------

// Called by onnxruntime (SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary).
// One domain per call: ORT keeps a reference to it in the session options; it is never released
// (a few bytes per registration), because sessions created from those options may outlive them.
VLS_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base ? api_base->GetApi(kOpVersion) : nullptr;
  // GetApi(v) is non-null iff the runtime's table has every entry of version v (it only grows).
  if (api_base && api_base->GetApi(kParallelForVersion) != nullptr) g_has_parallel_for.store(true);
  if (api == nullptr) {
    std::fprintf(stderr, "vlsparse: this onnxruntime does not provide C API version %u (needs onnxruntime >= 1.16)\n",
                 kOpVersion);
    return nullptr;  // cannot build an OrtStatus without the API; the model will then fail to load
  }
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_op_i16.op)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_op_i32.op)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_op_int8_i16.op)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_op_int8_i32.op)) return st;
  return api->AddCustomOpDomain(options, domain);
}

// OpenMP threads for SparseLinear in this process (0 = OpenMP default / VLSPARSE_NUM_THREADS); used only
// when the op runs on OpenMP (no KernelContext_ParallelFor, or vlsparse_ort_set_openmp(1)).
VLS_EXPORT void vlsparse_ort_set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0); }
VLS_EXPORT int vlsparse_ort_get_num_threads() { return g_num_threads.load(); }

// 1: run on a separate OpenMP pool even where onnxruntime's pool is available (for comparisons); 0: default.
VLS_EXPORT void vlsparse_ort_set_openmp(int on) { g_force_openmp.store(on != 0); }
// The pool the op runs on now: 1 = onnxruntime's intra-op pool, 0 = OpenMP. Known once a session
// was created with the library registered (before that: 0).
VLS_EXPORT int vlsparse_ort_uses_ort_pool() {
  return g_has_parallel_for.load() && !g_force_openmp.load() ? 1 : 0;
}

// ABI facts for tests: sizeof(OrtCustomOp) as declared here and the op version we register.
VLS_EXPORT int vlsparse_ort_custom_op_size() { return static_cast<int>(sizeof(OrtCustomOp)); }
VLS_EXPORT int vlsparse_ort_op_version() { return static_cast<int>(kOpVersion); }
