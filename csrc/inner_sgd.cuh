// CUDA kernels of pymeta::inner_sgd (out[k] = params[k] - scale * lr[k] * grads[k] over a
// list of tensors) and its fused backward: one launch per dtype for the whole list.
//
// Torch-free on purpose: plain pointers in small structs, sizes and a stream, so CI can
// compile-check this header with nvcc alone; csrc/inner_sgd.cu binds it to ATen. The
// operand layout (rows = task dim, row/col strides, stride-0 expanded params) is the one
// of csrc/inner_sgd.h. `scalar_t` is float, double, __half or __nv_bfloat16; `acc_t` (the
// compute and lr dtype) is float, or double for double.
//
// * forward: tiles of kForwardTile consecutive elements of one tensor; block b finds its
//   tensor by binary search over the entries' first tiles.
// * backward: blocks own a strip of kBackwardThreads columns over all rows, so an lr shared
//   by every task sums over rows in registers; per-task / per-layer lr gradients leave one
//   partial sum per (strip, row), added up in tile order by reduce_kernel (deterministic).
//   Sums of products are formed and added in double.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "inner_sgd_launch.h"  // constants and entry tables

namespace pymeta {
namespace inner_sgd_cuda {

// Storage <-> compute conversions: explicit intrinsics, because torch builds extensions
// with __CUDA_NO_HALF_CONVERSIONS__ (no implicit half casts).
template <typename acc_t>
__device__ __forceinline__ acc_t load(const float* x) { return *x; }
template <typename acc_t>
__device__ __forceinline__ acc_t load(const double* x) { return *x; }
template <typename acc_t>
__device__ __forceinline__ acc_t load(const __half* x) { return __half2float(*x); }
template <typename acc_t>
__device__ __forceinline__ acc_t load(const __nv_bfloat16* x) { return __bfloat162float(*x); }
__device__ __forceinline__ void store(float* out, float x) { *out = x; }
__device__ __forceinline__ void store(double* out, double x) { *out = x; }
__device__ __forceinline__ void store(__half* out, float x) { *out = __float2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16* out, float x) { *out = __float2bfloat16(x); }

// Index of the entry whose tiles contain `tile` (entries are sorted by first_tile).
template <typename Entry>
__device__ __forceinline__ int find_entry(const Entry* entries, int num_entries, int64_t tile) {
  int lo = 0, hi = num_entries - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (entries[mid].first_tile <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const ForwardEntry* __restrict__ entries, int num_entries, double neg_scale) {
  const int64_t tile = blockIdx.x;
  const ForwardEntry e = entries[find_entry(entries, num_entries, tile)];
  const Shape s = e.shape;
  const auto* p = static_cast<const scalar_t*>(e.p);
  const auto* g = static_cast<const scalar_t*>(e.g);
  const auto* lr = static_cast<const acc_t*>(e.lr);
  auto* out = static_cast<scalar_t*>(e.out);
  const acc_t neg = static_cast<acc_t>(neg_scale);
  const int64_t numel = s.rows * s.cols;
  const int64_t begin = (tile - e.first_tile) * kForwardTile;
  for (int i = threadIdx.x; i < kForwardTile; i += kForwardThreads) {
    const int64_t idx = begin + i;
    if (idx >= numel) return;
    const int64_t t = idx / s.cols, j = idx - t * s.cols;
    // (-scale * lr) * g + p: the rounding order of torch.addcmul, as the other backends.
    const acc_t rate = lr != nullptr ? neg * lr[t * s.lr_rs + j * s.lr_cs] : neg;
    store(out + idx, load<acc_t>(p + t * s.p_rs + j) + rate * load<acc_t>(g + t * s.g_rs + j));
  }
}

// Sum of `value` over the block (kBackwardThreads threads), valid in thread 0.
__device__ __forceinline__ double block_sum(double value, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read from the previous call
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kBackwardThreads / 32; ++w) total += shared[w];
  }
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const BackwardEntry* __restrict__ entries, int num_entries, double neg_scale,
                                double* __restrict__ partials) {
  __shared__ double shared[kBackwardThreads / 32];
  const int64_t tile = blockIdx.x;
  const BackwardEntry e = entries[find_entry(entries, num_entries, tile)];
  const Shape s = e.shape;
  const auto* go = static_cast<const scalar_t*>(e.go);
  const auto* g = static_cast<const scalar_t*>(e.g);
  const auto* lr = static_cast<const acc_t*>(e.lr);
  auto* grad_g = static_cast<scalar_t*>(e.grad_g);
  auto* grad_lr = static_cast<acc_t*>(e.grad_lr);
  const acc_t neg = static_cast<acc_t>(neg_scale);
  const int64_t j = (tile - e.first_tile) * kBackwardThreads + threadIdx.x;
  const bool in = j < s.cols;  // out-of-range threads still join the block sums
  double shared_cols = 0;      // an lr shared by every task: its gradient sums over rows
  for (int64_t t = 0; t < s.rows; ++t) {
    const acc_t go_tj = in ? load<acc_t>(go + t * s.p_rs + j) : acc_t(0);
    if (grad_g != nullptr && in) {
      const acc_t rate = lr != nullptr ? neg * lr[t * s.lr_rs + j * s.lr_cs] : neg;
      store(grad_g + t * s.cols + j, rate * go_tj);
    }
    if (grad_lr == nullptr) continue;
    const acc_t g_tj = in ? load<acc_t>(g + t * s.g_rs + j) : acc_t(0);
    if (s.lr_cs == 0) {  // per task or per layer: one partial sum per row
      const double row = block_sum(static_cast<double>(go_tj) * static_cast<double>(g_tj), shared);
      if (threadIdx.x == 0) partials[e.partial + (tile - e.first_tile) * s.rows + t] = row;
    } else if (s.lr_rs == 0) {  // per element, shared by every task
      shared_cols += static_cast<double>(go_tj) * static_cast<double>(g_tj);
    } else if (in) {  // per task and element
      grad_lr[t * s.lr_rs + j] = neg * (go_tj * g_tj);
    }
  }
  if (grad_lr != nullptr && s.lr_cs != 0 && s.lr_rs == 0 && in) {
    grad_lr[j] = static_cast<acc_t>(neg_scale * shared_cols);
  }
}

template <typename acc_t>
__global__ void reduce_kernel(const ReduceEntry* __restrict__ entries, double neg_scale,
                              const double* __restrict__ partials) {
  __shared__ double shared[kReduceThreads];
  const ReduceEntry e = entries[blockIdx.x];
  auto* grad_lr = static_cast<acc_t*>(e.grad_lr);
  double total = 0;
  for (int64_t t = threadIdx.x; t < e.rows; t += kReduceThreads) {
    double sum = 0;
    for (int64_t tile = 0; tile < e.tiles; ++tile) sum += partials[e.partial + tile * e.rows + t];  // tile order
    if (e.per_task) grad_lr[t] = static_cast<acc_t>(neg_scale * sum);
    total += sum;
  }
  if (e.per_task) return;
  shared[threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kReduceThreads; ++i) total += shared[i];
    grad_lr[0] = static_cast<acc_t>(neg_scale * total);
  }
}

// entries: device copy of plan.table; grid: plan.launch() (ForwardPlan, inner_sgd_launch.h).
template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const ForwardEntry* entries, int num_entries, const Launch& grid, double scale,
                           cudaStream_t stream) {
  if (grid.x == 0) return cudaSuccess;
  forward_kernel<scalar_t, acc_t><<<blocks(grid), grid.threads, 0, stream>>>(entries, num_entries, -scale);
  return cudaGetLastError();
}

// entries, reduce: device copies of plan.table and plan.reduce; grid, reduce_grid:
// plan.launch() and plan.reduce_launch(); partials: double workspace of plan.partials slots
// (BackwardPlan, inner_sgd_launch.h).
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const BackwardEntry* entries, int num_entries, const Launch& grid,
                            const ReduceEntry* reduce, const Launch& reduce_grid, double* partials, double scale,
                            cudaStream_t stream) {
  if (grid.x == 0) return cudaSuccess;
  backward_kernel<scalar_t, acc_t><<<blocks(grid), grid.threads, 0, stream>>>(entries, num_entries, -scale,
                                                                             partials);
  if (reduce_grid.x > 0) {
    reduce_kernel<acc_t><<<blocks(reduce_grid), reduce_grid.threads, 0, stream>>>(reduce, -scale, partials);
  }
  return cudaGetLastError();
}

}  // namespace inner_sgd_cuda
}  // namespace pymeta
