// Stand-ins that let the CUDA kernels (deform_conv_kernel.cu, deform_roi_pool_kernel.cu) compile and
// run on the host, unmodified, for the test-only "host-run" build (tests/hostcuda.py). Never part of
// the shipped extension: it is included only when MMDET_DCNV2_HOST_EMULATION is defined.
//
// A launch runs every block and every thread of the grid in turn, blocks in an order shuffled by a
// seed (and threads within a block too), so a result that depends on the order of atomic adds shows
// up as a difference between seeds. Nothing here models shared memory or __syncthreads: the kernels
// use neither (each thread's body is independent), which is what makes running threads one after
// another a faithful execution. gpuAtomicAdd is a plain +=: with one thread running at a time the
// add is atomic, and only the order of the adds varies, as on a GPU.
//
// Test knobs (set through torch.ops.mmdet_dcnv2_hostcuda._emulation, see host_run/knobs.cpp): the
// seed, a cap on the grid size (so that grid-stride loops repeat), the number of "SMs" the kernels
// size their grids by, and forcing 64-bit indices. Every launch is logged (kernel, grid, item count,
// index width) so that tests can check which configuration actually ran.
#pragma once

#ifndef MMDET_DCNV2_HOST_EMULATION
#error "host_emulation.h is for the test-only host-run build of the CUDA kernels"
#endif

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// CUDA's function and variable qualifiers mean nothing on the host.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace mmdet_dcnv2 {
namespace host_emulation {

struct Dim3 {
  unsigned int x = 1, y = 1, z = 1;  // unsigned int, as CUDA's uint3/dim3: the kernels' index
                                     // arithmetic must see the same integer promotions
};

// The launch in progress: one thread runs at a time, so plain globals are enough.
inline Dim3 blockIdx, threadIdx, blockDim, gridDim;

struct Knobs {
  uint64_t seed = 0;
  int64_t max_blocks = 0;         // > 0: cap on the grid (grid-stride loops then repeat)
  int64_t multiprocessors = 132;  // what getCurrentDeviceProperties reports (an H100/H200's count)
  bool force_wide_index = false;  // take the 64-bit index path whatever the sizes
};

struct LaunchRecord {
  std::string kernel;
  int64_t grid, items;
  int index_bits;
};

inline Knobs& knobs() {
  static Knobs k;
  return k;
}

inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

inline uint64_t& launch_counter() {
  static uint64_t n = 0;
  return n;
}

// Runs kernel(args...) for every (block, thread) of a grid x block launch.
template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  const char* name;
  int64_t grid, block;

  // The first argument of every kernel is its item count, of the kernel's index type.
  template <typename Items, typename... Args>
  void operator()(const Items& items, const Args&... args) const {
    using Index = std::tuple_element_t<0, std::tuple<Params...>>;
    const std::string kernel(name);  // "name<template arguments>": the name alone
    launch_log().push_back(
        {kernel.substr(0, kernel.find('<')), grid, static_cast<int64_t>(items), int(sizeof(Index) * 8)});
    // A fresh order per launch, reproducible from the seed.
    std::mt19937_64 rng(knobs().seed * 0x9E3779B97F4A7C15ull + ++launch_counter());
    std::vector<unsigned int> blocks(grid), threads(block);
    std::iota(blocks.begin(), blocks.end(), 0u);
    std::iota(threads.begin(), threads.end(), 0u);
    std::shuffle(blocks.begin(), blocks.end(), rng);
    gridDim = Dim3{static_cast<unsigned int>(grid), 1, 1};
    blockDim = Dim3{static_cast<unsigned int>(block), 1, 1};
    for (const unsigned int b : blocks) {
      std::shuffle(threads.begin(), threads.end(), rng);
      blockIdx = Dim3{b, 0, 0};
      for (const unsigned int t : threads) {
        threadIdx = Dim3{t, 0, 0};
        call(items, args...);
      }
    }
  }

 private:
  // Converts the arguments to the kernel's parameter types, as a <<<>>> launch does.
  template <typename... Args>
  void call(const Args&... args) const {
    kernel(static_cast<Params>(args)...);
  }
};

template <typename... Params>
Launcher<Params...> make_launcher(void (*kernel)(Params...), const char* name, int64_t grid, int64_t block) {
  return {kernel, name, grid, block};
}

struct Stream {};  // kernels run synchronously, in issue order: one stream

struct DeviceProperties {
  int multiProcessorCount;
};

}  // namespace host_emulation

using host_emulation::blockDim;
using host_emulation::blockIdx;
using host_emulation::gridDim;
using host_emulation::threadIdx;

// CUDA's device-side min/max for the kernels' unqualified calls.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
inline void gpuAtomicAdd(T* address, T value) {
  *address += value;
}

}  // namespace mmdet_dcnv2

// The emulated GPU is the CPU device: the ops of the host-run build take CPU tensors.
namespace at::cuda {
inline ::mmdet_dcnv2::host_emulation::Stream getCurrentCUDAStream() { return {}; }
inline const ::mmdet_dcnv2::host_emulation::DeviceProperties* getCurrentDeviceProperties() {
  static ::mmdet_dcnv2::host_emulation::DeviceProperties props;
  props.multiProcessorCount = static_cast<int>(::mmdet_dcnv2::host_emulation::knobs().multiprocessors);
  return &props;
}
}  // namespace at::cuda

namespace c10::cuda {
// Like the real guard, refuses a device that is not the (emulated) GPU, with the real one's message.
class CUDAGuard {
 public:
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "CUDAGuardImpl initialized with non-CUDA DeviceType: ", device.type());
  }
};
}  // namespace c10::cuda

// kernel<<<grid, block, 0, stream>>>(args) on the host.
#define DCN_LAUNCH(grid, block, stream, ...) \
  ::mmdet_dcnv2::host_emulation::make_launcher(&__VA_ARGS__, #__VA_ARGS__, (grid), (block))
// The host-run library registers the CUDA kernels for every backend (they then take CPU tensors,
// and a tensor on another device reaches the guard above, as a CPU tensor reaches the real one).
#define DCN_CUDA_DISPATCH_KEY CompositeExplicitAutograd
#define DCN_LAUNCH_MAX_BLOCKS() (::mmdet_dcnv2::host_emulation::knobs().max_blocks)
#define DCN_FORCE_WIDE_INDEX() (::mmdet_dcnv2::host_emulation::knobs().force_wide_index)
