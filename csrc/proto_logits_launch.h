// Host-side launch shapes of the CUDA kernels of pymeta::proto_logits (csrc/proto_logits.cuh).
// Plain C++17 (no CUDA, no torch), so CPU-only CI checks them (tests/test_cuda_launch.py).
#pragma once

#include <cstdint>

#include "cuda_launch.h"

namespace pymeta {
namespace proto_logits_cuda {

constexpr int kThreads = 128;
static_assert(kThreads % kWarpSize == 0 && kThreads <= kMaxThreads,
              "warp_sum shuffles over full warps; at most 1024 threads");

// forward_kernel: one block per query row of the T * Q; its warps share the N prototypes.
constexpr Launch forward_launch(int64_t T, int64_t Q) { return Launch{T * Q, 1, kThreads}; }

// row_norms_kernel: one warp per row.
constexpr Launch norms_launch(int64_t rows) {
  return Launch{ceil_div(rows, kThreads / kWarpSize), 1, kThreads};
}

// grad_query_kernel: block (t * Q + q, strip of kThreads features) of grad_query [T, Q, D].
constexpr Launch grad_query_launch(int64_t T, int64_t Q, int64_t D) { return rows_by_features(T * Q, D, kThreads); }

// grad_protos_kernel: block (t * N + n, strip of kThreads features) of grad_protos [T, N, D].
constexpr Launch grad_protos_launch(int64_t T, int64_t N, int64_t D) { return rows_by_features(T * N, D, kThreads); }

}  // namespace proto_logits_cuda
}  // namespace pymeta
