// Host-side shape of a CUDA kernel launch, shared by the *_launch.h headers of pymeta's CUDA
// kernels. Plain C++17 (no CUDA, no torch): CPU-only CI compiles and checks the launch
// arithmetic of every kernel (tests/test_cuda_launch.py), which otherwise only a GPU would run.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

namespace pymeta {

// A grid of x * y blocks of `threads` threads each (a launcher passes dim3(x, y) and threads).
struct Launch {
  int64_t x = 0, y = 1;
  int threads = 0;
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Limits of every CUDA device since compute capability 3.0 (CUDA C++ Programming Guide,
// "Compute Capabilities"): grid.x < 2^31, grid.y <= 65535, <= 1024 threads per block.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;
constexpr int kMaxThreads = 1024;
constexpr int kWarpSize = 32;

// `rows` blocks in x, each row's D features split into blocks of `threads` in y.
constexpr Launch rows_by_features(int64_t rows, int64_t D, int threads) {
  return Launch{rows, ceil_div(D, threads), threads};
}

#ifdef __CUDACC__
// The grid of a launch, for <<<blocks(l), l.threads, ...>>>.
inline dim3 blocks(const Launch& l) { return dim3(static_cast<unsigned>(l.x), static_cast<unsigned>(l.y)); }
#endif

}  // namespace pymeta
