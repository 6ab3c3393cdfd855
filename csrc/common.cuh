// Shared by every kernel file: element types, 16-byte vectors, warp reductions, and the
// launcher conventions. Kernel files include only CUDA headers (never torch), so each compiles in
// seconds and can be checked in isolation (ptxas register/spill report per kernel).
//
// Launcher convention: every host entry point `vk_<family>_<what>(...)` takes raw pointers,
// sizes, strides (in elements) and a cudaStream_t, and returns cudaError_t (cudaSuccess, or the
// launch error) so the torch layer can raise a message naming the op. Dtype codes: VK_F16, VK_BF16.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

enum VkDtype : int { VK_F16 = 0, VK_BF16 = 1 };

namespace vk {

// Byte offsets into tensors of B*T*D elements exceed 2^31 at ViT-B batch 4096, so every index that
// spans more than one row is int64.
using idx_t = int64_t;

template <typename T> struct TypeTraits;
template <> struct TypeTraits<__half> {
  using pair = __half2;
  __device__ static __forceinline__ float to_float(__half v) { return __half2float(v); }
  __device__ static __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  __device__ static __forceinline__ __half2 pair_from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};
template <> struct TypeTraits<__nv_bfloat16> {
  using pair = __nv_bfloat162;
  __device__ static __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static __forceinline__ __nv_bfloat162 pair_from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

template <typename T> __device__ __forceinline__ float to_f(T v) { return TypeTraits<T>::to_float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return TypeTraits<T>::from_float(v); }

// Packs two floats into the 32-bit register an mma.sync A fragment expects (low half = first).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  typename TypeTraits<T>::pair p = TypeTraits<T>::pair_from_floats(lo, hi);
  return *reinterpret_cast<uint32_t*>(&p);
}

// Eight 16-bit elements moved as one 16-byte access.
template <typename T> struct alignas(16) Vec8 {
  T v[8];
};

template <typename T> __device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
  Vec8<T> r = *reinterpret_cast<const Vec8<T>*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f(r.v[i]);
}

template <typename T> __device__ __forceinline__ void store8(T* p, const float (&in)[8]) {
  Vec8<T> r;
#pragma unroll
  for (int i = 0; i < 8; ++i) r.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Vec8<T>*>(p) = r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Exact GELU (erf form), the paper's and timm's default, and its derivative. The fp16 pre-activation
// the GEMM stores is -inf where the product passed -65504, and there x * Phi(x) and x * phi(x) are
// inf * 0 = NaN, while GELU and GELU' tend to 0 (and GELU' to 1 at +inf). A factor that is exactly 0
// therefore contributes 0: the same values as before for every finite x, and the limits at +-inf.
__device__ __forceinline__ float gelu_f(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  return cdf == 0.0f ? 0.0f : x * cdf;
}
__device__ __forceinline__ float dgelu_f(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
  return pdf == 0.0f ? cdf : cdf + x * pdf;
}

// tanh GELU (timm's GELU(approximate='tanh'), SigLIP): 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3),
// evaluated as x * sigmoid(2u) (the same function: 0.5 (1 + tanh(u)) = sigmoid(2u)), which has no
// cancellation where tanh(u) is near -1. Its derivative, with s = sigmoid(2u):
//   s + x * 2 s (1 - s) * u',  u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
// Limits as for the erf form: s == 0 (x -> -inf, or u past expf's range) gives 0 and 0, and
// s (1 - s) == 0 (both tails) gives the derivative s; an inf x never meets a 0 factor.
__device__ __forceinline__ float tanh_gelu_gate(float x) {
  const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
  return 1.0f / (1.0f + expf(-2.0f * u));
}
__device__ __forceinline__ float gelu_tanh_f(float x) {
  const float s = tanh_gelu_gate(x);
  return s == 0.0f ? 0.0f : x * s;
}
__device__ __forceinline__ float dgelu_tanh_f(float x) {
  const float s = tanh_gelu_gate(x);
  const float ds = s * (1.0f - s);
  return ds == 0.0f ? s : s + 2.0f * x * ds * (0.79788456080286536f * (1.0f + 3.0f * 0.044715f * x * x));
}

// QuickGELU (OpenAI CLIP): x * sigmoid(1.702 x); derivative s + 1.702 x s (1 - s), s = sigmoid(1.702 x).
// Same limits: 0 and 0 at -inf, x and 1 at +inf.
__device__ __forceinline__ float quick_gelu_f(float x) {
  const float s = 1.0f / (1.0f + expf(-1.702f * x));
  return s == 0.0f ? 0.0f : x * s;
}
__device__ __forceinline__ float dquick_gelu_f(float x) {
  const float s = 1.0f / (1.0f + expf(-1.702f * x));
  const float ds = s * (1.0f - s);
  return ds == 0.0f ? s : s + 1.702f * x * ds;
}

// Blocks of b covering a, as a grid dimension. A count past 2^32 - 1 is not wrapped into a smaller grid
// (which would silently skip work): it becomes 0, which every launch refuses (invalid configuration),
// so the op fails with the launch error. bindings.cpp checks the sizes it narrows before that.
inline unsigned ceil_div(long long a, long long b) {
  const long long blocks = (a + b - 1) / b;
  return blocks > 0xFFFFFFFFLL ? 0u : static_cast<unsigned>(blocks);
}

}  // namespace vk

// Dispatches a dtype code to a typed body: VK_DISPATCH(dtype, T, { kernel<T><<<...>>>(...); })
#define VK_DISPATCH(dtype, T, ...)            \
  do {                                        \
    if ((dtype) == VK_F16) {                  \
      using T = __half;                       \
      __VA_ARGS__;                            \
    } else if ((dtype) == VK_BF16) {          \
      using T = __nv_bfloat16;                \
      __VA_ARGS__;                            \
    } else {                                  \
      return cudaErrorInvalidValue;           \
    }                                         \
  } while (0)
