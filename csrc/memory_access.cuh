// CUDA kernels of pymeta::memory_access (one MANN step: LRU write, cosine reads) and its
// fused backward. The formulas are in pymeta/ops/memory_access.py.
//
// Torch-free on purpose (plain pointers, sizes, a stream) so CI can compile-check this
// header with nvcc alone; csrc/memory_access.cu binds it to ATen. One block per task walks
// through the step in phases separated by __syncthreads(): elementwise phases spread
// (head, row) or (row, feature) pairs over the block's threads, per-head reductions over
// the rows (softmax, least-used rows) take one warp per head. Intermediates live in a
// float workspace in global memory (`acc_t`: float, or double for double), so any memory
// size fits. Least-used rows: H rounds of a warp argmin over the rows not yet chosen,
// comparing (usage, index) pairs, so ties go to the lowest index as in every backend.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "prototypes.cuh"  // to_acc / from_acc conversions

namespace pymeta {
namespace memory_access_cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Workspace sizes per task (in acc_t elements).
__host__ __device__ inline int64_t forward_workspace(int64_t R, int64_t W, int64_t H) { return 2 * H * R + R * W + R; }
__host__ __device__ inline int64_t backward_workspace(int64_t R, int64_t W, int64_t H) { return 3 * H * R + R * W + R + 2 * H; }

// The H least-used rows of u [R] into lu [H], by warp 0 of the block.
template <typename scalar_t, typename acc_t>
__device__ void least_used(const scalar_t* u, int64_t R, int64_t H, int64_t* lu) {
  if (threadIdx.x >= kWarp) return;
  const int lane = threadIdx.x;
  for (int64_t h = 0; h < H; ++h) {
    bool found = false;
    acc_t best = 0;
    int64_t best_row = R;
    for (int64_t i = lane; i < R; i += kWarp) {
      bool taken = false;
      for (int64_t j = 0; j < h; ++j) taken |= lu[j] == i;
      const acc_t v = to_acc<acc_t>(u[i]);
      if (!taken && (!found || v < best)) {  // rows ascend per lane: the first of equal values stays
        best = v;
        best_row = i;
        found = true;
      }
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const acc_t other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int64_t other_row = __shfl_xor_sync(0xffffffffu, best_row, offset);
      const bool other_found = __shfl_xor_sync(0xffffffffu, static_cast<int>(found), offset) != 0;
      if (other_found && (!found || other < best || (other == best && other_row < best_row))) {
        best = other;
        best_row = other_row;
        found = true;
      }
    }
    if (lane == 0) lu[h] = best_row;
    __syncwarp();
  }
}

// ww[h, i] = g_h * wr_prev[h, i] + (1 - g_h) [i == lu_h], for the block's share of (h, i).
template <typename scalar_t, typename acc_t>
__device__ void write_weights(const scalar_t* wr_prev, const scalar_t* gates, const int64_t* lu, int64_t H, int64_t R,
                              acc_t* ww) {
  for (int64_t hi = threadIdx.x; hi < H * R; hi += blockDim.x) {
    const int64_t h = hi / R, i = hi % R;
    const acc_t g = to_acc<acc_t>(gates[h]);
    ww[hi] = g * to_acc<acc_t>(wr_prev[hi]) + (i == lu[h] ? acc_t(1) - g : acc_t(0));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ memory, const scalar_t* __restrict__ usage,
                               const scalar_t* __restrict__ wr_prev, const scalar_t* __restrict__ keys,
                               const scalar_t* __restrict__ adds, const scalar_t* __restrict__ gates, acc_t gamma,
                               acc_t eps, scalar_t* __restrict__ reads, scalar_t* __restrict__ wr_out,
                               scalar_t* __restrict__ mem_out, scalar_t* __restrict__ usage_out,
                               int64_t* __restrict__ lu_out, acc_t* __restrict__ workspace, int64_t R, int64_t W,
                               int64_t H) {
  const int64_t t = blockIdx.x;
  memory += t * R * W, usage += t * R, wr_prev += t * H * R, keys += t * H * W, adds += t * H * W, gates += t * H;
  reads += t * H * W, wr_out += t * H * R, mem_out += t * R * W, usage_out += t * R, lu_out += t * H;
  acc_t* ww = workspace + t * forward_workspace(R, W, H);
  acc_t* w = ww + H * R;  // similarities, then read weights
  acc_t* m = w + H * R;   // the new memory
  acc_t* mm = m + R * W;  // its squared row norms

  least_used<scalar_t, acc_t>(usage, R, H, lu_out);
  __syncthreads();
  write_weights(wr_prev, gates, lu_out, H, R, ww);
  __syncthreads();
  const int64_t lu0 = lu_out[0];  // zeroed before the write
  for (int64_t id = threadIdx.x; id < R * W; id += blockDim.x) {
    const int64_t i = id / W, d = id % W;
    acc_t v = i == lu0 ? acc_t(0) : to_acc<acc_t>(memory[id]);
    for (int64_t h = 0; h < H; ++h) v += ww[h * R + i] * to_acc<acc_t>(adds[h * W + d]);
    m[id] = v;
    mem_out[id] = from_acc<scalar_t>(v);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) {
    acc_t s = 0;
    for (int64_t d = 0; d < W; ++d) s += m[i * W + d] * m[i * W + d];
    mm[i] = s;
  }
  __syncthreads();
  for (int64_t hi = threadIdx.x; hi < H * R; hi += blockDim.x) {
    const int64_t h = hi / R, i = hi % R;
    acc_t kk = 0, dot = 0;
    for (int64_t d = 0; d < W; ++d) {
      const acc_t k = to_acc<acc_t>(keys[h * W + d]);
      kk += k * k;
      dot += k * m[i * W + d];
    }
    w[hi] = dot / sqrt(kk * mm[i] + eps);
  }
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t h = warp; h < H; h += blockDim.x / kWarp) {  // softmax over the rows, one warp per head
    acc_t* row = w + h * R;
    acc_t top = -INFINITY;
    for (int64_t i = lane; i < R; i += kWarp) top = max(top, row[i]);
    top = warp_max(top);
    acc_t sum = 0;
    for (int64_t i = lane; i < R; i += kWarp) sum += (row[i] = exp(row[i] - top));
    sum = warp_sum(sum);
    for (int64_t i = lane; i < R; i += kWarp) {
      row[i] /= sum;
      wr_out[h * R + i] = from_acc<scalar_t>(row[i]);
    }
  }
  __syncthreads();
  for (int64_t hd = threadIdx.x; hd < H * W; hd += blockDim.x) {
    const int64_t h = hd / W, d = hd % W;
    acc_t r = 0;
    for (int64_t i = 0; i < R; ++i) r += w[h * R + i] * m[i * W + d];
    reads[hd] = from_acc<scalar_t>(r);
  }
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) {
    acc_t u = gamma * to_acc<acc_t>(usage[i]);
    for (int64_t h = 0; h < H; ++h) u += w[h * R + i] + ww[h * R + i];
    usage_out[i] = from_acc<scalar_t>(u);
  }
}

// Gradient pointers of the backward: inputs g_*, outputs o_* (as the forward's inputs).
template <typename scalar_t>
struct Grads {
  const scalar_t *g_reads, *g_wr, *g_mem, *g_usage;
  scalar_t *o_mem, *o_usage, *o_wr_prev, *o_keys, *o_adds, *o_gates;
};

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(Grads<scalar_t> g, const scalar_t* __restrict__ wr_prev,
                                const scalar_t* __restrict__ keys, const scalar_t* __restrict__ adds,
                                const scalar_t* __restrict__ gates, const scalar_t* __restrict__ wr,
                                const scalar_t* __restrict__ mem, const int64_t* __restrict__ lu, acc_t gamma,
                                acc_t eps, acc_t* __restrict__ workspace, int64_t R, int64_t W, int64_t H) {
  const int64_t t = blockIdx.x;
  g.g_reads += t * H * W, g.g_wr += t * H * R, g.g_mem += t * R * W, g.g_usage += t * R;
  g.o_mem += t * R * W, g.o_usage += t * R, g.o_wr_prev += t * H * R, g.o_keys += t * H * W;
  g.o_adds += t * H * W, g.o_gates += t * H;
  wr_prev += t * H * R, keys += t * H * W, adds += t * H * W, gates += t * H, wr += t * H * R, mem += t * R * W;
  lu += t * H;
  acc_t* ww = workspace + t * backward_workspace(R, W, H);
  acc_t* c = ww + H * R;  // gradient of the read weights, then g_sim / norm, then of the write weights
  acc_t* e = c + H * R;   // similarities, then g_sim sim / norm^2
  acc_t* gm = e + H * R;  // gradient of the new memory
  acc_t* mm = gm + R * W;
  acc_t* kk = mm + R;
  acc_t* key_scale = kk + H;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  write_weights(wr_prev, gates, lu, H, R, ww);
  for (int64_t i = threadIdx.x; i < R + H; i += blockDim.x) {
    const bool row = i < R;
    const scalar_t* x = row ? mem + i * W : keys + (i - R) * W;
    acc_t s = 0;
    for (int64_t d = 0; d < W; ++d) s += to_acc<acc_t>(x[d]) * to_acc<acc_t>(x[d]);
    (row ? mm[i] : kk[i - R]) = s;
  }
  __syncthreads();
  for (int64_t hi = threadIdx.x; hi < H * R; hi += blockDim.x) {
    const int64_t h = hi / R, i = hi % R;
    acc_t dot = 0, g_read_dot = 0;
    for (int64_t d = 0; d < W; ++d) {
      const acc_t m = to_acc<acc_t>(mem[i * W + d]);
      dot += to_acc<acc_t>(keys[h * W + d]) * m;
      g_read_dot += to_acc<acc_t>(g.g_reads[h * W + d]) * m;
    }
    e[hi] = dot / sqrt(kk[h] * mm[i] + eps);
    c[hi] = to_acc<acc_t>(g.g_wr[hi]) + to_acc<acc_t>(g.g_usage[i]) + g_read_dot;
  }
  __syncthreads();
  for (int64_t h = warp; h < H; h += blockDim.x / kWarp) {  // softmax backward, one warp per head
    acc_t mean = 0;
    for (int64_t i = lane; i < R; i += kWarp) mean += to_acc<acc_t>(wr[h * R + i]) * c[h * R + i];
    mean = warp_sum(mean);
    acc_t scale = 0;
    for (int64_t i = lane; i < R; i += kWarp) {
      const int64_t hi = h * R + i;
      const acc_t norm = sqrt(kk[h] * mm[i] + eps);
      const acc_t g_sim = to_acc<acc_t>(wr[hi]) * (c[hi] - mean);
      c[hi] = g_sim / norm;
      e[hi] = g_sim * e[hi] / (norm * norm);
      scale += e[hi] * mm[i];
    }
    scale = warp_sum(scale);
    if (lane == 0) key_scale[h] = scale;
  }
  __syncthreads();
  for (int64_t hd = threadIdx.x; hd < H * W; hd += blockDim.x) {
    const int64_t h = hd / W, d = hd % W;
    acc_t s = -to_acc<acc_t>(keys[hd]) * key_scale[h];
    for (int64_t i = 0; i < R; ++i) s += c[h * R + i] * to_acc<acc_t>(mem[i * W + d]);
    g.o_keys[hd] = from_acc<scalar_t>(s);
  }
  for (int64_t id = threadIdx.x; id < R * W; id += blockDim.x) {
    const int64_t i = id / W, d = id % W;
    acc_t s = to_acc<acc_t>(g.g_mem[id]), row_scale = 0;
    for (int64_t h = 0; h < H; ++h) {
      s += to_acc<acc_t>(wr[h * R + i]) * to_acc<acc_t>(g.g_reads[h * W + d]) +
           c[h * R + i] * to_acc<acc_t>(keys[h * W + d]);
      row_scale += e[h * R + i] * kk[h];
    }
    gm[id] = s - to_acc<acc_t>(mem[id]) * row_scale;
  }
  __syncthreads();
  // The write: adds, write weights (-> previous read weights and gates), old memory, usage.
  for (int64_t hd = threadIdx.x; hd < H * W; hd += blockDim.x) {
    const int64_t h = hd / W, d = hd % W;
    acc_t s = 0;
    for (int64_t i = 0; i < R; ++i) s += ww[h * R + i] * gm[i * W + d];
    g.o_adds[hd] = from_acc<scalar_t>(s);
  }
  for (int64_t hi = threadIdx.x; hi < H * R; hi += blockDim.x) {
    const int64_t h = hi / R, i = hi % R;
    acc_t g_ww = to_acc<acc_t>(g.g_usage[i]);
    for (int64_t d = 0; d < W; ++d) g_ww += to_acc<acc_t>(adds[h * W + d]) * gm[i * W + d];
    c[hi] = g_ww;
    g.o_wr_prev[hi] = from_acc<scalar_t>(to_acc<acc_t>(gates[h]) * g_ww);
  }
  for (int64_t id = threadIdx.x; id < R * W; id += blockDim.x) {
    g.o_mem[id] = from_acc<scalar_t>(id / W == lu[0] ? acc_t(0) : gm[id]);
  }
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) g.o_usage[i] = from_acc<scalar_t>(gamma * to_acc<acc_t>(g.g_usage[i]));
  __syncthreads();
  for (int64_t h = warp; h < H; h += blockDim.x / kWarp) {
    acc_t s = 0;
    for (int64_t i = lane; i < R; i += kWarp) {
      s += c[h * R + i] * (to_acc<acc_t>(wr_prev[h * R + i]) - (i == lu[h] ? acc_t(1) : acc_t(0)));
    }
    s = warp_sum(s);
    if (lane == 0) g.o_gates[h] = from_acc<scalar_t>(s);
  }
}

// memory [T, R, W], usage [T, R], wr_prev [T, H, R], keys, adds [T, H, W], gates [T, H] ->
// reads [T, H, W], wr_out [T, H, R], mem_out [T, R, W], usage_out [T, R], lu_out [T, H];
// workspace: T * forward_workspace(R, W, H) acc_t elements.
template <typename scalar_t, typename acc_t>
cudaError_t launch_forward(const scalar_t* memory, const scalar_t* usage, const scalar_t* wr_prev,
                           const scalar_t* keys, const scalar_t* adds, const scalar_t* gates, acc_t gamma, acc_t eps,
                           scalar_t* reads, scalar_t* wr_out, scalar_t* mem_out, scalar_t* usage_out, int64_t* lu_out,
                           acc_t* workspace, int64_t T, int64_t R, int64_t W, int64_t H, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
      memory, usage, wr_prev, keys, adds, gates, gamma, eps, reads, wr_out, mem_out, usage_out, lu_out, workspace, R,
      W, H);
  return cudaGetLastError();
}

// Gradients of the forward's inputs from those of its outputs; workspace:
// T * backward_workspace(R, W, H) acc_t elements.
template <typename scalar_t, typename acc_t>
cudaError_t launch_backward(const Grads<scalar_t>& grads, const scalar_t* wr_prev, const scalar_t* keys,
                            const scalar_t* adds, const scalar_t* gates, const scalar_t* wr, const scalar_t* mem,
                            const int64_t* lu, acc_t gamma, acc_t eps, acc_t* workspace, int64_t T, int64_t R,
                            int64_t W, int64_t H, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
      grads, wr_prev, keys, adds, gates, wr, mem, lu, gamma, eps, workspace, R, W, H);
  return cudaGetLastError();
}

}  // namespace memory_access_cuda
}  // namespace pymeta
