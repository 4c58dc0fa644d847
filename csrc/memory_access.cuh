// CUDA kernels of pymeta::memory_access (one MANN step: LRU write, cosine reads) and its
// fused backward. The formulas are in pymeta/ops/memory_access.py.
//
// Torch-free on purpose (plain pointers, sizes, a stream) so CI can compile-check this
// header with nvcc alone; csrc/memory_access.cu binds it to ATen. One block per task walks
// through the step in phases separated by __syncthreads(): elementwise phases spread
// (head, row) or (row, feature) pairs over the block's threads, per-head reductions over
// the rows (softmax, least-used rows) take one warp per head. Intermediates live in a
// workspace in global memory, so any memory size fits. `real` is float or double: the
// binding computes half and bfloat16 inputs in float. Least-used rows: H rounds of a warp argmin over the rows not yet chosen,
// comparing (usage, index) pairs, so ties go to the lowest index as in every backend.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace pymeta {
namespace memory_access_cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename real>
__device__ __forceinline__ real warp_sum(real v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename real>
__device__ __forceinline__ real warp_max(real v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Workspace sizes per task (in real elements).
__host__ __device__ inline int64_t forward_workspace(int64_t R, int64_t W, int64_t H) { return 2 * H * R + R * W + R; }
__host__ __device__ inline int64_t backward_workspace(int64_t R, int64_t W, int64_t H) { return 3 * H * R + R * W + R + 2 * H; }

// The H least-used rows of u [R] into lu [H], by warp 0 of the block.
template <typename real>
__device__ void least_used(const real* u, int64_t R, int64_t H, int64_t* lu) {
  if (threadIdx.x >= kWarp) return;
  const int lane = threadIdx.x;
  for (int64_t h = 0; h < H; ++h) {
    bool found = false;
    real best = 0;
    int64_t best_row = R;
    for (int64_t i = lane; i < R; i += kWarp) {
      bool taken = false;
      for (int64_t j = 0; j < h; ++j) taken |= lu[j] == i;
      const real v = u[i];
      if (!taken && (!found || v < best)) {  // rows ascend per lane: the first of equal values stays
        best = v;
        best_row = i;
        found = true;
      }
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const real other = __shfl_xor_sync(0xffffffffu, best, offset);
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
template <typename real>
__device__ void write_weights(const real* wr_prev, const real* gates, const int64_t* lu, int64_t H, int64_t R,
                              real* ww) {
  for (int64_t hi = threadIdx.x; hi < H * R; hi += blockDim.x) {
    const int64_t h = hi / R, i = hi % R;
    const real g = gates[h];
    ww[hi] = g * wr_prev[hi] + (i == lu[h] ? real(1) - g : real(0));
  }
}

template <typename real>
__global__ void forward_kernel(const real* __restrict__ memory, const real* __restrict__ usage,
                               const real* __restrict__ wr_prev, const real* __restrict__ keys,
                               const real* __restrict__ adds, const real* __restrict__ gates, real gamma,
                               real eps, real* __restrict__ reads, real* __restrict__ wr_out,
                               real* __restrict__ mem_out, real* __restrict__ usage_out,
                               int64_t* __restrict__ lu_out, real* __restrict__ workspace, int64_t R, int64_t W,
                               int64_t H) {
  const int64_t t = blockIdx.x;
  memory += t * R * W, usage += t * R, wr_prev += t * H * R, keys += t * H * W, adds += t * H * W, gates += t * H;
  reads += t * H * W, wr_out += t * H * R, mem_out += t * R * W, usage_out += t * R, lu_out += t * H;
  real* ww = workspace + t * forward_workspace(R, W, H);
  real* w = ww + H * R;  // similarities, then read weights
  real* m = w + H * R;   // the new memory
  real* mm = m + R * W;  // its squared row norms

  least_used(usage, R, H, lu_out);
  __syncthreads();
  write_weights(wr_prev, gates, lu_out, H, R, ww);
  __syncthreads();
  const int64_t lu0 = lu_out[0];  // zeroed before the write
  for (int64_t id = threadIdx.x; id < R * W; id += blockDim.x) {
    const int64_t i = id / W, d = id % W;
    real v = i == lu0 ? real(0) : memory[id];
    for (int64_t h = 0; h < H; ++h) v += ww[h * R + i] * adds[h * W + d];
    m[id] = v;
    mem_out[id] = v;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) {
    real s = 0;
    for (int64_t d = 0; d < W; ++d) s += m[i * W + d] * m[i * W + d];
    mm[i] = s;
  }
  __syncthreads();
  for (int64_t hi = threadIdx.x; hi < H * R; hi += blockDim.x) {
    const int64_t h = hi / R, i = hi % R;
    real kk = 0, dot = 0;
    for (int64_t d = 0; d < W; ++d) {
      const real k = keys[h * W + d];
      kk += k * k;
      dot += k * m[i * W + d];
    }
    w[hi] = dot / sqrt(kk * mm[i] + eps);
  }
  __syncthreads();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t h = warp; h < H; h += blockDim.x / kWarp) {  // softmax over the rows, one warp per head
    real* row = w + h * R;
    real top = -INFINITY;
    for (int64_t i = lane; i < R; i += kWarp) top = max(top, row[i]);
    top = warp_max(top);
    real sum = 0;
    for (int64_t i = lane; i < R; i += kWarp) sum += (row[i] = exp(row[i] - top));
    sum = warp_sum(sum);
    for (int64_t i = lane; i < R; i += kWarp) {
      row[i] /= sum;
      wr_out[h * R + i] = row[i];
    }
  }
  __syncthreads();
  for (int64_t hd = threadIdx.x; hd < H * W; hd += blockDim.x) {
    const int64_t h = hd / W, d = hd % W;
    real r = 0;
    for (int64_t i = 0; i < R; ++i) r += w[h * R + i] * m[i * W + d];
    reads[hd] = r;
  }
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) {
    real u = gamma * usage[i];
    for (int64_t h = 0; h < H; ++h) u += w[h * R + i] + ww[h * R + i];
    usage_out[i] = u;
  }
}

// Gradient pointers of the backward: inputs g_*, outputs o_* (as the forward's inputs).
template <typename real>
struct Grads {
  const real *g_reads, *g_wr, *g_mem, *g_usage;
  real *o_mem, *o_usage, *o_wr_prev, *o_keys, *o_adds, *o_gates;
};

template <typename real>
__global__ void backward_kernel(Grads<real> g, const real* __restrict__ wr_prev,
                                const real* __restrict__ keys, const real* __restrict__ adds,
                                const real* __restrict__ gates, const real* __restrict__ wr,
                                const real* __restrict__ mem, const int64_t* __restrict__ lu, real gamma,
                                real eps, real* __restrict__ workspace, int64_t R, int64_t W, int64_t H) {
  const int64_t t = blockIdx.x;
  g.g_reads += t * H * W, g.g_wr += t * H * R, g.g_mem += t * R * W, g.g_usage += t * R;
  g.o_mem += t * R * W, g.o_usage += t * R, g.o_wr_prev += t * H * R, g.o_keys += t * H * W;
  g.o_adds += t * H * W, g.o_gates += t * H;
  wr_prev += t * H * R, keys += t * H * W, adds += t * H * W, gates += t * H, wr += t * H * R, mem += t * R * W;
  lu += t * H;
  real* ww = workspace + t * backward_workspace(R, W, H);
  real* c = ww + H * R;  // gradient of the read weights, then g_sim / norm, then of the write weights
  real* e = c + H * R;   // similarities, then g_sim sim / norm^2
  real* gm = e + H * R;  // gradient of the new memory
  real* mm = gm + R * W;
  real* kk = mm + R;
  real* key_scale = kk + H;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  write_weights(wr_prev, gates, lu, H, R, ww);
  for (int64_t i = threadIdx.x; i < R + H; i += blockDim.x) {
    const bool row = i < R;
    const real* x = row ? mem + i * W : keys + (i - R) * W;
    real s = 0;
    for (int64_t d = 0; d < W; ++d) s += x[d] * x[d];
    (row ? mm[i] : kk[i - R]) = s;
  }
  __syncthreads();
  for (int64_t hi = threadIdx.x; hi < H * R; hi += blockDim.x) {
    const int64_t h = hi / R, i = hi % R;
    real dot = 0, g_read_dot = 0;
    for (int64_t d = 0; d < W; ++d) {
      const real m = mem[i * W + d];
      dot += keys[h * W + d] * m;
      g_read_dot += g.g_reads[h * W + d] * m;
    }
    e[hi] = dot / sqrt(kk[h] * mm[i] + eps);
    c[hi] = g.g_wr[hi] + g.g_usage[i] + g_read_dot;
  }
  __syncthreads();
  for (int64_t h = warp; h < H; h += blockDim.x / kWarp) {  // softmax backward, one warp per head
    real mean = 0;
    for (int64_t i = lane; i < R; i += kWarp) mean += wr[h * R + i] * c[h * R + i];
    mean = warp_sum(mean);
    real scale = 0;
    for (int64_t i = lane; i < R; i += kWarp) {
      const int64_t hi = h * R + i;
      const real norm = sqrt(kk[h] * mm[i] + eps);
      const real g_sim = wr[hi] * (c[hi] - mean);
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
    real s = -keys[hd] * key_scale[h];
    for (int64_t i = 0; i < R; ++i) s += c[h * R + i] * mem[i * W + d];
    g.o_keys[hd] = s;
  }
  for (int64_t id = threadIdx.x; id < R * W; id += blockDim.x) {
    const int64_t i = id / W, d = id % W;
    real s = g.g_mem[id], row_scale = 0;
    for (int64_t h = 0; h < H; ++h) {
      s += wr[h * R + i] * g.g_reads[h * W + d] +
           c[h * R + i] * keys[h * W + d];
      row_scale += e[h * R + i] * kk[h];
    }
    gm[id] = s - mem[id] * row_scale;
  }
  __syncthreads();
  // The write: adds, write weights (-> previous read weights and gates), old memory, usage.
  for (int64_t hd = threadIdx.x; hd < H * W; hd += blockDim.x) {
    const int64_t h = hd / W, d = hd % W;
    real s = 0;
    for (int64_t i = 0; i < R; ++i) s += ww[h * R + i] * gm[i * W + d];
    g.o_adds[hd] = s;
  }
  for (int64_t hi = threadIdx.x; hi < H * R; hi += blockDim.x) {
    const int64_t h = hi / R, i = hi % R;
    real g_ww = g.g_usage[i];
    for (int64_t d = 0; d < W; ++d) g_ww += adds[h * W + d] * gm[i * W + d];
    c[hi] = g_ww;
    g.o_wr_prev[hi] = gates[h] * g_ww;
  }
  for (int64_t id = threadIdx.x; id < R * W; id += blockDim.x) {
    g.o_mem[id] = (id / W == lu[0] ? real(0) : gm[id]);
  }
  for (int64_t i = threadIdx.x; i < R; i += blockDim.x) g.o_usage[i] = (gamma * g.g_usage[i]);
  __syncthreads();
  for (int64_t h = warp; h < H; h += blockDim.x / kWarp) {
    real s = 0;
    for (int64_t i = lane; i < R; i += kWarp) {
      s += c[h * R + i] * (wr_prev[h * R + i] - (i == lu[h] ? real(1) : real(0)));
    }
    s = warp_sum(s);
    if (lane == 0) g.o_gates[h] = s;
  }
}

// memory [T, R, W], usage [T, R], wr_prev [T, H, R], keys, adds [T, H, W], gates [T, H] ->
// reads [T, H, W], wr_out [T, H, R], mem_out [T, R, W], usage_out [T, R], lu_out [T, H];
// workspace: T * forward_workspace(R, W, H) real elements.
template <typename real>
cudaError_t launch_forward(const real* memory, const real* usage, const real* wr_prev,
                           const real* keys, const real* adds, const real* gates, real gamma, real eps,
                           real* reads, real* wr_out, real* mem_out, real* usage_out, int64_t* lu_out,
                           real* workspace, int64_t T, int64_t R, int64_t W, int64_t H, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  forward_kernel<real><<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
      memory, usage, wr_prev, keys, adds, gates, gamma, eps, reads, wr_out, mem_out, usage_out, lu_out, workspace, R,
      W, H);
  return cudaGetLastError();
}

// Gradients of the forward's inputs from those of its outputs; workspace:
// T * backward_workspace(R, W, H) real elements.
template <typename real>
cudaError_t launch_backward(const Grads<real>& grads, const real* wr_prev, const real* keys,
                            const real* adds, const real* gates, const real* wr, const real* mem,
                            const int64_t* lu, real gamma, real eps, real* workspace, int64_t T, int64_t R,
                            int64_t W, int64_t H, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  backward_kernel<real><<<static_cast<unsigned>(T), kThreads, 0, stream>>>(
      grads, wr_prev, keys, adds, gates, wr, mem, lu, gamma, eps, workspace, R, W, H);
  return cudaGetLastError();
}

}  // namespace memory_access_cuda
}  // namespace pymeta
