// CUDA kernels of pymeta::proto_logits and its fused backward.
//
// Torch-free on purpose (plain pointers, sizes, a stream) so CI can compile-check this
// header with nvcc alone; csrc/proto_logits.cu binds it to ATen. Like the C++ kernels
// these sum (q - p)^2 directly rather than expanding |q|^2 + |p|^2 - 2 q.p: exact to
// rounding for any common offset of the features, never negative, and with N ~ 5
// prototypes per task the direct sum is one pass over the query either way.
// `metric` is the index in pymeta.ops.proto_logits.METRICS.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "proto_logits_launch.h"
#include "prototypes.cuh"  // to_acc / from_acc conversions

namespace pymeta {
namespace proto_logits_cuda {

enum Metric : int { kSqEuclidean = 0, kEuclidean = 1, kCosine = 2 };
constexpr int kWarp = kWarpSize;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Forward: one block per query row; warp w handles prototypes w, w + 4, ..., its lanes
// striding over D, then a shuffle reduction.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ query, const scalar_t* __restrict__ protos,
                               scalar_t* __restrict__ out, int64_t Q, int64_t N, int64_t D, int metric, acc_t eps) {
  const int64_t row = blockIdx.x, t = row / Q;
  const scalar_t* q = query + row * D;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int64_t n = warp; n < N; n += warps) {
    const scalar_t* p = protos + (t * N + n) * D;
    acc_t a = 0, qq = 0, pp = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t x = to_acc<acc_t>(q[d]), y = to_acc<acc_t>(p[d]);
      if (metric == kCosine) {
        a += x * y;
        qq += x * x;
        pp += y * y;
      } else {
        a += (x - y) * (x - y);
      }
    }
    a = warp_sum(a);
    if (metric == kCosine) {
      qq = warp_sum(qq);
      pp = warp_sum(pp);
    }
    if (lane == 0) {
      acc_t v;
      if (metric == kCosine) {
        v = a / (fmax(sqrt(qq), eps) * fmax(sqrt(pp), eps));
      } else {
        v = metric == kSqEuclidean ? -a : -sqrt(a);
      }
      out[row * N + n] = from_acc<scalar_t>(v);
    }
  }
}

// Euclidean norm of each of `rows` rows (one warp per row), for the cosine backward.
template <typename scalar_t, typename acc_t>
__global__ void row_norms_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ norms, int64_t rows,
                                 int64_t D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarp;
  acc_t s = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t v = to_acc<acc_t>(x[row * D + d]);
    s += v * v;
  }
  s = warp_sum(s);
  if (lane == 0) norms[row] = sqrt(s);
}

// Weight of (q - p_n) in the Euclidean gradients: -2 g (sqeuclidean), g / out (euclidean,
// out = -|q - p|; 0 at distance 0 where the gradient is taken to be 0).
template <typename acc_t>
__device__ __forceinline__ acc_t euclid_weight(acc_t g, acc_t o, int metric) {
  if (metric == kSqEuclidean) return acc_t(-2) * g;
  return o < acc_t(0) ? g / o : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t inv_norm(acc_t norm, acc_t eps) {
  return acc_t(1) / fmax(norm, eps);
}

// Radial factor k = (1 / |x|)^2 where the norm is not clamped, 0 where it is.
template <typename acc_t>
__device__ __forceinline__ acc_t radial(acc_t norm, acc_t eps) {
  return norm > eps ? acc_t(1) / (norm * norm) : acc_t(0);
}

// grad_query: grid (T * Q, ceil(D / kThreads)), one thread per (row, d), looping over N.
template <typename scalar_t, typename acc_t>
__global__ void grad_query_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ logits,
                                  const scalar_t* __restrict__ query, const scalar_t* __restrict__ protos,
                                  const acc_t* __restrict__ q_norms, const acc_t* __restrict__ p_norms,
                                  scalar_t* __restrict__ grad_query, int64_t Q, int64_t N, int64_t D, int metric,
                                  acc_t eps) {
  const int64_t row = blockIdx.x, t = row / Q;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const acc_t x = to_acc<acc_t>(query[row * D + d]);
  acc_t acc = 0;
  if (metric == kCosine) {
    // grad_q = rq sum_n g rp_n p_n - (sum_n g out) kq q
    const acc_t rq = inv_norm(q_norms[row], eps);
    acc_t row_sum = 0;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t g = to_acc<acc_t>(grad[row * N + n]);
      acc += g * rq * inv_norm(p_norms[t * N + n], eps) * to_acc<acc_t>(protos[(t * N + n) * D + d]);
      row_sum += g * to_acc<acc_t>(logits[row * N + n]);
    }
    acc -= row_sum * radial(q_norms[row], eps) * x;
  } else {
    for (int64_t n = 0; n < N; ++n) {
      const acc_t w = euclid_weight(to_acc<acc_t>(grad[row * N + n]), to_acc<acc_t>(logits[row * N + n]), metric);
      acc += w * (x - to_acc<acc_t>(protos[(t * N + n) * D + d]));
    }
  }
  grad_query[row * D + d] = from_acc<scalar_t>(acc);
}

// grad_protos: grid (T * N, ceil(D / kThreads)), one thread per (prototype, d), looping
// over the task's queries (coalesced across d); no atomics, so it is deterministic.
template <typename scalar_t, typename acc_t>
__global__ void grad_protos_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ logits,
                                   const scalar_t* __restrict__ query, const scalar_t* __restrict__ protos,
                                   const acc_t* __restrict__ q_norms, const acc_t* __restrict__ p_norms,
                                   scalar_t* __restrict__ grad_protos, int64_t Q, int64_t N, int64_t D, int metric,
                                   acc_t eps) {
  const int64_t tn = blockIdx.x, t = tn / N, n = tn % N;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  const acc_t y = to_acc<acc_t>(protos[tn * D + d]);
  acc_t acc = 0;
  if (metric == kCosine) {
    // grad_p = rp sum_q g rq q - (sum_q g out) kp p
    const acc_t rp = inv_norm(p_norms[tn], eps);
    acc_t col_sum = 0;
    for (int64_t qi = 0; qi < Q; ++qi) {
      const int64_t row = t * Q + qi;
      const acc_t g = to_acc<acc_t>(grad[row * N + n]);
      acc += g * rp * inv_norm(q_norms[row], eps) * to_acc<acc_t>(query[row * D + d]);
      col_sum += g * to_acc<acc_t>(logits[row * N + n]);
    }
    acc -= col_sum * radial(p_norms[tn], eps) * y;
  } else {
    for (int64_t qi = 0; qi < Q; ++qi) {
      const int64_t row = t * Q + qi;
      const acc_t w = euclid_weight(to_acc<acc_t>(grad[row * N + n]), to_acc<acc_t>(logits[row * N + n]), metric);
      acc -= w * (to_acc<acc_t>(query[row * D + d]) - y);
    }
  }
  grad_protos[tn * D + d] = from_acc<scalar_t>(acc);
}

// query [T, Q, D], protos [T, N, D] -> out [T, Q, N].
template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const scalar_t* query, const scalar_t* protos, scalar_t* out, int64_t T, int64_t Q,
                           int64_t N, int64_t D, int metric, acc_t eps, cudaStream_t stream) {
  if (T * Q * N == 0) return cudaSuccess;
  const Launch grid = forward_launch(T, Q);
  forward_kernel<scalar_t, acc_t><<<blocks(grid), grid.threads, 0, stream>>>(query, protos, out, Q, N, D, metric, eps);
  return cudaGetLastError();
}

// grad, logits [T, Q, N] -> grad_query [T, Q, D], grad_protos [T, N, D]. q_norms [T * Q]
// and p_norms [T * N] are acc_t workspaces, used (and may be null) unless metric is cosine.
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const scalar_t* grad, const scalar_t* logits, const scalar_t* query,
                            const scalar_t* protos, scalar_t* grad_query, scalar_t* grad_protos, acc_t* q_norms,
                            acc_t* p_norms, int64_t T, int64_t Q, int64_t N, int64_t D, int metric, acc_t eps,
                            cudaStream_t stream) {
  if (D == 0) return cudaSuccess;
  if (metric == kCosine) {
    const Launch q_grid = norms_launch(T * Q), p_grid = norms_launch(T * N);
    if (T * Q > 0) {
      row_norms_kernel<scalar_t, acc_t><<<blocks(q_grid), q_grid.threads, 0, stream>>>(query, q_norms, T * Q, D);
    }
    if (T * N > 0) {
      row_norms_kernel<scalar_t, acc_t><<<blocks(p_grid), p_grid.threads, 0, stream>>>(protos, p_norms, T * N, D);
    }
  }
  const Launch q_grid = grad_query_launch(T, Q, D), p_grid = grad_protos_launch(T, N, D);
  if (T * Q > 0) {
    grad_query_kernel<scalar_t, acc_t><<<blocks(q_grid), q_grid.threads, 0, stream>>>(
        grad, logits, query, protos, q_norms, p_norms, grad_query, Q, N, D, metric, eps);
  }
  if (T * N > 0) {
    grad_protos_kernel<scalar_t, acc_t><<<blocks(p_grid), p_grid.threads, 0, stream>>>(
        grad, logits, query, protos, q_norms, p_norms, grad_protos, Q, N, D, metric, eps);
  }
  return cudaGetLastError();
}

}  // namespace proto_logits_cuda
}  // namespace pymeta
