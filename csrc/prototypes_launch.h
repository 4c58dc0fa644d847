// Host-side launch shapes of the CUDA kernels of pymeta::prototypes (csrc/prototypes.cuh).
// Plain C++17 (no CUDA, no torch), so CPU-only CI checks them (tests/test_cuda_launch.py).
#pragma once

#include <cstdint>

#include "cuda_launch.h"

namespace pymeta {
namespace prototypes_cuda {

constexpr int kThreads = 256;
static_assert(kThreads % kWarpSize == 0 && kThreads <= kMaxThreads, "whole warps, at most 1024 threads");

// class_counts_kernel: one thread per (task, class) of the T * N.
constexpr Launch counts_launch(int64_t T, int64_t N) { return Launch{ceil_div(T * N, kThreads), 1, kThreads}; }

// forward_kernel: block (t * N + c, strip of kThreads features) of out [T, N, D].
constexpr Launch forward_launch(int64_t T, int64_t N, int64_t D) { return rows_by_features(T * N, D, kThreads); }

// backward_kernel: block (t * S + s, strip of kThreads features) of grad_support [T, S, D].
constexpr Launch backward_launch(int64_t T, int64_t S, int64_t D) { return rows_by_features(T * S, D, kThreads); }

}  // namespace prototypes_cuda
}  // namespace pymeta
