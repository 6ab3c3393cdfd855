// vk_emu: runs vitkern's CUDA kernels (csrc/*.cu) on the CPU, for tests on machines without a GPU.
//
// tests/cuda_emu/translate.py rewrites the three pieces of CUDA syntax a host compiler cannot
// parse (kernel<<<grid, block, smem, stream>>>(args), __shared__ declarations, the inline PTX of
// mma.sync) into calls to this header, and g++ compiles the result with `-include vk_emu.h`.
// Everything else, the kernels' index math, masking, tiling, fragment maps and host launch code,
// is compiled exactly as written.
//
// Execution model (emu_runtime.cpp): a launch runs its CTAs one after another; the threads of a CTA
// are fibers on one OS thread, each with its own stack, switched only at __syncthreads and at warp
// collectives (__shfl_xor_sync, mma.sync). What it checks that a GPU would not tell you plainly:
//   * every warp collective with the full mask finds all 32 lanes at the same collective (no lane
//     exited or diverged), and a __syncthreads that not all live threads reach is a deadlock, reported;
//   * shared memory starts every CTA filled with 0xFF bytes (NaN in fp16, bf16 and fp32), so a read
//     of shared memory nobody wrote shows up as NaN in the output;
//   * between two __syncthreads, warps run one after another to the barrier, in a selectable order
//     (forward, reverse, random): a race on shared memory (a missing __syncthreads) makes the
//     outputs of two orders differ, or reads the other tile's data and fails the comparison;
//   * launch limits: block size, grid size, dynamic shared memory against the 48 KiB default and the
//     cudaFuncAttributeMaxDynamicSharedMemorySize a kernel raised it to, and the device maximum.
// mma.sync follows the PTX ISA's fragment layouts for m16n8k16 (see ptx_mma in emu_runtime.cpp),
// with products and sums in double, rounded to fp32 once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

// Function-space qualifiers mean nothing on the host.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace vk_emu {

// The calling fiber's built-in variables.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void syncthreads();
uint32_t shfl_xor32(unsigned mask, uint32_t value, int lane_mask, int width);
// D = A B + C for one warp; `instr` is the PTX instruction text (checked against what is emulated).
void ptx_mma(const char* instr, std::array<float*, 4> d, std::array<uint32_t, 4> a, std::array<uint32_t, 2> b,
             std::array<float, 4> c);

// This CTA's dynamic shared memory, and a static __shared__ array identified by its source site.
void* dynamic_smem();
void* static_smem(int site, size_t bytes, size_t align);
template <class A> A& static_shared(int site) { return *static_cast<A*>(static_smem(site, sizeof(A), alignof(A))); }

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

void launch_impl(const LaunchConfig& cfg, const void* kernel, std::function<void()> body);

// kernel<<<cfg>>>(args...): the arguments are converted to the kernel's parameter types once, as a
// real launch does, and every thread calls the kernel with its own copies.
template <class... P, class... A> void launch(const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launch: wrong number of arguments");
  std::tuple<P...> params(static_cast<P>(std::forward<A>(args))...);
  launch_impl(cfg, reinterpret_cast<const void*>(kernel), [kernel, params]() { std::apply(kernel, params); });
}

}  // namespace vk_emu

#define threadIdx (::vk_emu::thread_idx())
#define blockIdx (::vk_emu::block_idx())
#define blockDim (::vk_emu::block_dim())
#define gridDim (::vk_emu::grid_dim())
#define __syncthreads() ::vk_emu::syncthreads()

template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) == 4, "vk_emu emulates 32-bit shuffles only");
  uint32_t bits;
  std::memcpy(&bits, &var, 4);
  bits = ::vk_emu::shfl_xor32(mask, bits, lane_mask, width);
  std::memcpy(&var, &bits, 4);
  return var;
}

// CUDA's device math that glibc lacks (rsqrtf is within 2 ulp on the GPU; exact here).
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// cuda_runtime.h declares this typed overload for nvcc only.
template <class T> inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
