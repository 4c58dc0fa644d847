// CUDA kernels of pymeta::prototypes (per-task class means) and its backward.
//
// Torch-free on purpose: plain pointers, sizes and a stream, so CI can compile-check this
// header with nvcc alone; csrc/prototypes.cu binds it to ATen. `scalar_t` is float,
// double, __half or __nv_bfloat16; `acc_t` is the accumulation type (float, or double
// for double). Labels are int64 and have been checked by the caller (in [0, N), no empty
// class); the kernels still skip out-of-range labels so they never read out of bounds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "prototypes_launch.h"

namespace pymeta {

// Load/store conversions between storage and accumulation types. Explicit intrinsics,
// because torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ (no implicit casts).
// Shared with proto_logits.cuh.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t x) {
  return static_cast<scalar_t>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16(x);
}

namespace prototypes_cuda {

// Class counts [T, N] (int32): one thread per (task, class), scanning the task's labels.
static __global__ void class_counts_kernel(const int64_t* __restrict__ labels, int* __restrict__ counts, int64_t T,
                                    int64_t S, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * N) return;
  const int64_t t = i / N, c = i % N;
  int count = 0;
  for (int64_t s = 0; s < S; ++s) count += labels[t * S + s] == c;
  counts[i] = count;
}

// Means: forward_launch (blocks (t * N + c, feature strip)); each thread owns one feature d of one class
// and sums the support rows with that label (reads are coalesced across d).
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ support, const int64_t* __restrict__ labels,
                               const int* __restrict__ counts, scalar_t* __restrict__ out, int64_t S, int64_t N,
                               int64_t D) {
  const int64_t tc = blockIdx.x, t = tc / N, c = tc % N;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  acc_t sum = 0;
  for (int64_t s = 0; s < S; ++s) {
    if (labels[t * S + s] == c) sum += to_acc<acc_t>(support[(t * S + s) * D + d]);
  }
  out[tc * D + d] = from_acc<scalar_t>(sum / static_cast<acc_t>(counts[tc]));
}

// grad_support[t, s, d] = grad[t, labels[t, s], d] / counts[t, labels[t, s]];
// backward_launch (blocks (t * S + s, feature strip)).
template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ labels,
                                const int* __restrict__ counts, scalar_t* __restrict__ grad_support, int64_t S,
                                int64_t N, int64_t D) {
  const int64_t ts = blockIdx.x, t = ts / S;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const int64_t c = labels[ts];
  acc_t value = 0;
  if (c >= 0 && c < N) {
    value = to_acc<acc_t>(grad[(t * N + c) * D + d]) / static_cast<acc_t>(counts[t * N + c]);
  }
  grad_support[ts * D + d] = from_acc<scalar_t>(value);
}

// support [T, S, D], labels [T, S] -> out [T, N, D]; counts: int32 workspace of T * N.
template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const scalar_t* support, const int64_t* labels, scalar_t* out, int* counts, int64_t T,
                           int64_t S, int64_t N, int64_t D, cudaStream_t stream) {
  if (T * N == 0) return cudaSuccess;
  const Launch count_grid = counts_launch(T, N), grid = forward_launch(T, N, D);
  class_counts_kernel<<<blocks(count_grid), count_grid.threads, 0, stream>>>(labels, counts, T, S, N);
  if (D > 0) {
    forward_kernel<scalar_t, acc_t><<<blocks(grid), grid.threads, 0, stream>>>(support, labels, counts, out, S, N, D);
  }
  return cudaGetLastError();
}

// grad [T, N, D], labels [T, S] -> grad_support [T, S, D]; counts: int32 workspace of T * N.
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const scalar_t* grad, const int64_t* labels, scalar_t* grad_support, int* counts,
                            int64_t T, int64_t S, int64_t N, int64_t D, cudaStream_t stream) {
  if (T * N == 0 || T * S * D == 0) return cudaSuccess;
  const Launch count_grid = counts_launch(T, N), grid = backward_launch(T, S, D);
  class_counts_kernel<<<blocks(count_grid), count_grid.threads, 0, stream>>>(labels, counts, T, S, N);
  backward_kernel<scalar_t, acc_t><<<blocks(grid), grid.threads, 0, stream>>>(grad, labels, counts, grad_support, S,
                                                                              N, D);
  return cudaGetLastError();
}

}  // namespace prototypes_cuda
}  // namespace pymeta
