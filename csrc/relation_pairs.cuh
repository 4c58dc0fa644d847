// CUDA kernels of pymeta::relation_pairs (Relation Network pairs: broadcast sum,
// per-task BatchNorm, ReLU) and its backward. Math: pymeta/ops/relation_pairs.py and
// csrc/relation_pairs.cpp (the same closed-form statistics and one-pass backward).
//
// Torch-free on purpose (plain pointers, sizes, a stream) so CI can compile-check this
// header with nvcc alone; csrc/relation_pairs.cu binds it to ATen. Layout (contiguous):
// classes a [T, N, C, HW], queries b [T, Q, C, HW], pairs [T, Q, N, C, HW], per-channel
// parameters [T, C]; `acc_t` is float (double for double) and so are the statistics and
// the G [T, N, C, HW] / H [T, Q, C, HW] / s1, s2 [T, C] workspaces of the backward.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "prototypes.cuh"  // to_acc / from_acc conversions

namespace pymeta {
namespace relation_pairs_cuda {

constexpr int kThreads = 256;        // elementwise forward
constexpr int kReduceThreads = 128;  // one block per (task, channel), threads over positions
constexpr int kWarp = 32;

// Sum of `v` over the block, returned to every thread; `shared` holds one value per warp.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();  // a previous call may still be reading `shared`
  if (threadIdx.x % kWarp == 0) shared[threadIdx.x / kWarp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x) / kWarp; ++w) total += shared[w];
  return total;
}

// sum_n a[t, n, c, i] from x = &a[t, 0, c, i] (stride C * HW between classes); likewise for b.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t side_sum(const scalar_t* x, int64_t count, int64_t stride) {
  acc_t sum = 0;
  for (int64_t j = 0; j < count; ++j) sum += to_acc<acc_t>(x[j * stride]);
  return sum;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t side_mean(const scalar_t* x, int64_t count, int64_t stride) {
  return side_sum<acc_t>(x, count, stride) / static_cast<acc_t>(count);
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t side_spread(const scalar_t* x, int64_t count, int64_t stride, acc_t mean) {
  acc_t sum = 0;
  for (int64_t j = 0; j < count; ++j) {
    const acc_t d = to_acc<acc_t>(x[j * stride]) - mean;
    sum += d * d;
  }
  return sum / static_cast<acc_t>(count);
}

// mean, invstd [T * C]: the running statistics (running_mean != nullptr) or the batch
// statistics of each task's pairs in closed form. One block per (task, channel).
template <typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                             const scalar_t* __restrict__ running_mean, const scalar_t* __restrict__ running_var,
                             acc_t* __restrict__ mean, acc_t* __restrict__ invstd, int64_t N, int64_t Q, int64_t C,
                             int64_t HW, acc_t eps) {
  const int64_t tc = blockIdx.x, t = tc / C, c = tc % C;
  if (running_mean != nullptr) {
    if (threadIdx.x == 0) {
      mean[tc] = to_acc<acc_t>(running_mean[tc]);
      invstd[tc] = acc_t(1) / sqrt(to_acc<acc_t>(running_var[tc]) + eps);
    }
    return;
  }
  __shared__ acc_t shared[kReduceThreads / kWarp];
  const scalar_t* a0 = a + (t * N * C + c) * HW;
  const scalar_t* b0 = b + (t * Q * C + c) * HW;
  acc_t total = 0;
  for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
    total += side_mean<acc_t>(a0 + i, N, C * HW) + side_mean<acc_t>(b0 + i, Q, C * HW);
  }
  const acc_t m = block_sum(total, shared) / static_cast<acc_t>(HW);
  acc_t spread = 0;
  for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
    const acc_t abar = side_mean<acc_t>(a0 + i, N, C * HW), bbar = side_mean<acc_t>(b0 + i, Q, C * HW);
    const acc_t d = abar + bbar - m;
    spread += side_spread(a0 + i, N, C * HW, abar) + side_spread(b0 + i, Q, C * HW, bbar) + d * d;
  }
  const acc_t var = block_sum(spread, shared) / static_cast<acc_t>(HW);
  if (threadIdx.x == 0) {
    mean[tc] = m;
    invstd[tc] = acc_t(1) / sqrt(var + eps);
  }
}

// out[t, q, n, c, i] = relu((a[t, n, c, i] + b[t, q, c, i] - mean) * invstd * w + bias); grid-stride.
template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                               const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                               const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                               scalar_t* __restrict__ out, int64_t T, int64_t N, int64_t Q, int64_t C, int64_t HW) {
  const int64_t plane = C * HW, total = T * Q * N * plane;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % plane, pair = idx / plane, n = pair % N, q = pair / N % Q, t = pair / (N * Q);
    const int64_t tc = t * C + i / HW;
    // The backward recomputes z in this order, so both see the same ReLU mask.
    const acc_t z = (to_acc<acc_t>(a[(t * N + n) * plane + i]) + to_acc<acc_t>(b[(t * Q + q) * plane + i]) - mean[tc]) *
                        invstd[tc] * to_acc<acc_t>(weight[tc]) +
                    to_acc<acc_t>(bias[tc]);
    out[idx] = from_acc<scalar_t>(z > acc_t(0) ? z : acc_t(0));
  }
}

// One pass over the gradient g of the pairs, one block per (task, channel), each thread
// owning positions i: G[t, n, c, i] = sum_q gz, H[t, q, c, i] = sum_n gz, s1 = sum gz,
// s2 = sum gz * xhat, with gz = g [z > 0].
template <typename scalar_t, typename acc_t>
__global__ void backward_reduce_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ a,
                                       const scalar_t* __restrict__ b, const scalar_t* __restrict__ weight,
                                       const scalar_t* __restrict__ bias, const acc_t* __restrict__ mean,
                                       const acc_t* __restrict__ invstd, acc_t* __restrict__ G, acc_t* __restrict__ H,
                                       acc_t* __restrict__ s1, acc_t* __restrict__ s2, int64_t N, int64_t Q,
                                       int64_t C, int64_t HW) {
  __shared__ acc_t shared[kReduceThreads / kWarp];
  const int64_t tc = blockIdx.x, t = tc / C, c = tc % C, plane = C * HW;
  const acc_t m = mean[tc], inv = invstd[tc], w = to_acc<acc_t>(weight[tc]), beta = to_acc<acc_t>(bias[tc]);
  acc_t sum1 = 0, sum2 = 0;
  for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
    for (int64_t q = 0; q < Q; ++q) {
      const acc_t bq = to_acc<acc_t>(b[(t * Q + q) * plane + c * HW + i]);
      acc_t h = 0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t an = (t * N + n) * plane + c * HW + i;
        const acc_t x = (to_acc<acc_t>(a[an]) + bq - m) * inv;
        const acc_t v = x * w + beta > acc_t(0) ? to_acc<acc_t>(g[((t * Q + q) * N + n) * plane + c * HW + i]) : acc_t(0);
        G[an] = (q == 0 ? acc_t(0) : G[an]) + v;  // this thread's own entry: no race
        h += v;
        sum1 += v;
        sum2 += v * x;
      }
      H[(t * Q + q) * plane + c * HW + i] = h;
    }
  }
  sum1 = block_sum(sum1, shared);
  sum2 = block_sum(sum2, shared);
  if (threadIdx.x == 0) {
    s1[tc] = sum1;
    s2[tc] = sum2;
  }
}

// grad a = w invstd (G_n - Q s1/M - s2/M sum_q xhat), grad b = w invstd (H_q - N s1/M -
// s2/M sum_n xhat) in train mode (batch_stats); w invstd G_n and w invstd H_q in eval mode.
template <typename scalar_t, typename acc_t>
__global__ void backward_finalize_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                         const scalar_t* __restrict__ weight, const acc_t* __restrict__ mean,
                                         const acc_t* __restrict__ invstd, const acc_t* __restrict__ G,
                                         const acc_t* __restrict__ H, const acc_t* __restrict__ s1,
                                         const acc_t* __restrict__ s2, scalar_t* __restrict__ ga,
                                         scalar_t* __restrict__ gb, int64_t N, int64_t Q, int64_t C, int64_t HW,
                                         bool batch_stats) {
  const int64_t tc = blockIdx.x, t = tc / C, c = tc % C, plane = C * HW;
  const acc_t m = mean[tc], inv = invstd[tc], k = to_acc<acc_t>(weight[tc]) * inv;
  const acc_t M = static_cast<acc_t>(Q * N * HW), mu1 = s1[tc] / M, mu2 = s2[tc] / M;
  const acc_t Qa = static_cast<acc_t>(Q), Na = static_cast<acc_t>(N);
  for (int64_t i = threadIdx.x; i < HW; i += blockDim.x) {
    const scalar_t* a0 = a + (t * N) * plane + c * HW + i;
    const scalar_t* b0 = b + (t * Q) * plane + c * HW + i;
    const acc_t asum = batch_stats ? side_sum<acc_t>(a0, N, plane) : acc_t(0);
    const acc_t bsum = batch_stats ? side_sum<acc_t>(b0, Q, plane) : acc_t(0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t at = (t * N + n) * plane + c * HW + i;
      acc_t v = G[at];
      if (batch_stats) v -= Qa * mu1 + mu2 * inv * (Qa * (to_acc<acc_t>(a[at]) - m) + bsum);
      ga[at] = from_acc<scalar_t>(k * v);
    }
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t bt = (t * Q + q) * plane + c * HW + i;
      acc_t v = H[bt];
      if (batch_stats) v -= Na * mu1 + mu2 * inv * (asum + Na * (to_acc<acc_t>(b[bt]) - m));
      gb[bt] = from_acc<scalar_t>(k * v);
    }
  }
}

// classes a [T, N, C, HW], queries b [T, Q, C, HW] -> out [T, Q, N, C, HW]; mean, invstd:
// workspaces of T * C (running statistics: pass them, else nullptr for batch statistics).
template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const scalar_t* a, const scalar_t* b, const scalar_t* weight, const scalar_t* bias,
                           const scalar_t* running_mean, const scalar_t* running_var, acc_t eps, acc_t* mean,
                           acc_t* invstd, scalar_t* out, int64_t T, int64_t N, int64_t Q, int64_t C, int64_t HW,
                           cudaStream_t stream) {
  const int64_t total = T * Q * N * C * HW;
  if (total == 0) return cudaSuccess;
  stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(T * C), kReduceThreads, 0, stream>>>(
      a, b, running_mean, running_var, mean, invstd, N, Q, C, HW, eps);
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks < (1 << 30) ? blocks : (1 << 30)), kThreads, 0,
                                    stream>>>(a, b, weight, bias, mean, invstd, out, T, N, Q, C, HW);
  return cudaGetLastError();
}

// grad [T, Q, N, C, HW] -> ga [T, N, C, HW], gb [T, Q, C, HW], and s2, s1 [T * C] (the
// gradients of weight and bias); mean, invstd [T * C], G, H (shaped as ga, gb): workspaces.
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const scalar_t* grad, const scalar_t* a, const scalar_t* b, const scalar_t* weight,
                            const scalar_t* bias, const scalar_t* running_mean, const scalar_t* running_var,
                            acc_t eps, acc_t* mean, acc_t* invstd, acc_t* G, acc_t* H, acc_t* s1, acc_t* s2,
                            scalar_t* ga, scalar_t* gb, int64_t T, int64_t N, int64_t Q, int64_t C, int64_t HW,
                            cudaStream_t stream) {
  if (T * Q * N * C * HW == 0) return cudaSuccess;  // the caller zero-fills the outputs
  const unsigned blocks = static_cast<unsigned>(T * C);
  stats_kernel<scalar_t, acc_t><<<blocks, kReduceThreads, 0, stream>>>(a, b, running_mean, running_var, mean, invstd,
                                                                      N, Q, C, HW, eps);
  backward_reduce_kernel<scalar_t, acc_t><<<blocks, kReduceThreads, 0, stream>>>(grad, a, b, weight, bias, mean,
                                                                                invstd, G, H, s1, s2, N, Q, C, HW);
  backward_finalize_kernel<scalar_t, acc_t><<<blocks, kReduceThreads, 0, stream>>>(
      a, b, weight, mean, invstd, G, H, s1, s2, ga, gb, N, Q, C, HW, running_mean == nullptr);
  return cudaGetLastError();
}

}  // namespace relation_pairs_cuda
}  // namespace pymeta
