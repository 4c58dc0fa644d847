// C++ CPU kernels of pymeta::memory_access (one MANN step: LRU write, cosine reads) and
// its fused backward. The formulas are in pymeta/ops/memory_access.py.
//
// A MANN step is small (about 1 MFLOP for 16 tasks with a 128 x 40 memory and 4 heads), so
// on CPU its cost in composite PyTorch is the number of ATen calls (about 40 forward and
// 110 forward + backward). Here each direction is one call. Tasks run in parallel
// (at::parallel_for); within a task the kernels make one pass over the memory rows per
// phase, each row's W features contiguous: the write, the row norm and the H similarities
// of a row in one pass (forward), then the reads; the backward's second pass builds a row's
// memory gradient in a W-long buffer and takes from it the gradients of the adds, the
// write weights and the gates before storing it. The loops over W vectorise; the
// entry points are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time
// (the JIT build passes no -march flag, so the cached library stays portable). Half and
// bfloat16 inputs are computed in float (their at::opmath_type) and rounded once at the end.
//
// Least-used rows: H passes of argmin over the rows not yet chosen, the first (lowest)
// index winning ties: the first H entries of a stable ascending sort, as the reference.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYMETA_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYMETA_ISA_CLONES
#endif
// Inner kernels must be inlined into the cloned entry points to be compiled for their ISA.
#define PYMETA_INLINE inline __attribute__((always_inline))

namespace {

struct Sizes {
  int64_t T, R, W, H;
};

template <typename T>
PYMETA_INLINE T dot(const T* __restrict__ x, const T* __restrict__ y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += x[d] * y[d];
  return s;
}

template <typename T>
PYMETA_INLINE void axpy(T a, const T* __restrict__ x, T* __restrict__ y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// The H least-used rows of u [R], ascending, ties to the lowest index.
template <typename T>
PYMETA_INLINE void least_used(const T* u, int64_t R, int64_t H, int64_t* lu) {
  for (int64_t h = 0; h < H; ++h) {
    int64_t best = -1;
    for (int64_t i = 0; i < R; ++i) {
      bool taken = false;
      for (int64_t j = 0; j < h; ++j) taken |= lu[j] == i;
      if (!taken && (best < 0 || u[i] < u[best])) best = i;
    }
    lu[h] = best;
  }
}

// ww[h, i] = g_h * wr_prev[h, i] + (1 - g_h) [i == lu_h]
template <typename T>
PYMETA_INLINE void write_weights(const T* wr_prev, const T* gates, const int64_t* lu, int64_t H, int64_t R, T* ww) {
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < R; ++i) ww[h * R + i] = gates[h] * wr_prev[h * R + i];
    ww[h * R + lu[h]] += T(1) - gates[h];
  }
}

template <typename T>
struct Forward {
  const T *memory, *usage, *wr_prev, *keys, *adds, *gates;
  T gamma, eps;
  T *reads, *wr, *mem, *new_usage;
  int64_t* lu;
};

template <typename T>
PYMETA_INLINE void forward_tasks(const Sizes& s, const Forward<T>& f, int64_t begin, int64_t end) {
  const int64_t R = s.R, W = s.W, H = s.H;
  std::vector<T> ww(H * R), kk(H);
  for (int64_t t = begin; t < end; ++t) {
    const T *k = f.keys + t * H * W, *a = f.adds + t * H * W;
    T *m = f.mem + t * R * W, *w = f.wr + t * H * R, *reads = f.reads + t * H * W;
    int64_t* lu = f.lu + t * H;
    least_used(f.usage + t * R, R, H, lu);
    write_weights(f.wr_prev + t * H * R, f.gates + t * H, lu, H, R, ww.data());
    for (int64_t h = 0; h < H; ++h) kk[h] = dot(k + h * W, k + h * W, W);
    // Per row: the write (the least-used row zeroed first), its norm, its similarities.
    for (int64_t i = 0; i < R; ++i) {
      T* row = m + i * W;
      if (i == lu[0]) {
        std::fill(row, row + W, T(0));
      } else {
        std::copy(f.memory + (t * R + i) * W, f.memory + (t * R + i + 1) * W, row);
      }
      for (int64_t h = 0; h < H; ++h) axpy(ww[h * R + i], a + h * W, row, W);
      const T mm = dot(row, row, W);
      for (int64_t h = 0; h < H; ++h) w[h * R + i] = dot(k + h * W, row, W) / std::sqrt(kk[h] * mm + f.eps);
    }
    for (int64_t h = 0; h < H; ++h) {  // softmax over the rows, in place
      T* sim = w + h * R;
      const T top = *std::max_element(sim, sim + R);
      T sum = 0;
      for (int64_t i = 0; i < R; ++i) sum += (sim[i] = std::exp(sim[i] - top));
      for (int64_t i = 0; i < R; ++i) sim[i] /= sum;
    }
    std::fill(reads, reads + H * W, T(0));
    for (int64_t i = 0; i < R; ++i) {
      T u = f.gamma * f.usage[t * R + i];
      for (int64_t h = 0; h < H; ++h) {
        axpy(w[h * R + i], m + i * W, reads + h * W, W);
        u += w[h * R + i] + ww[h * R + i];
      }
      f.new_usage[t * R + i] = u;
    }
  }
}

PYMETA_ISA_CLONES void forward_isa(const Sizes& s, const Forward<float>& f, int64_t begin, int64_t end) {
  forward_tasks(s, f, begin, end);
}
PYMETA_ISA_CLONES void forward_isa(const Sizes& s, const Forward<double>& f, int64_t begin, int64_t end) {
  forward_tasks(s, f, begin, end);
}

template <typename T>
struct Backward {
  const T *g_reads, *g_wr, *g_mem, *g_usage, *wr_prev, *keys, *adds, *gates, *wr, *mem;
  const int64_t* lu;
  T gamma, eps;
  T *o_mem, *o_usage, *o_wr_prev, *o_keys, *o_adds, *o_gates;
};

template <typename T>
PYMETA_INLINE void backward_tasks(const Sizes& s, const Backward<T>& b, int64_t begin, int64_t end) {
  const int64_t R = s.R, W = s.W, H = s.H;
  std::vector<T> ww(H * R), kk(H), mm(R), c(H * R), e(H * R), g_row(W);
  for (int64_t t = begin; t < end; ++t) {
    const T *k = b.keys + t * H * W, *a = b.adds + t * H * W, *m = b.mem + t * R * W, *w = b.wr + t * H * R;
    const T *gr = b.g_reads + t * H * W, *gu = b.g_usage + t * R, *wr_prev = b.wr_prev + t * H * R;
    const T* gates = b.gates + t * H;
    const int64_t* lu = b.lu + t * H;
    T *g_keys = b.o_keys + t * H * W, *g_adds = b.o_adds + t * H * W, *g_gates = b.o_gates + t * H;
    write_weights(wr_prev, gates, lu, H, R, ww.data());
    for (int64_t h = 0; h < H; ++h) kk[h] = dot(k + h * W, k + h * W, W);
    // Pass 1: per (head, row) the similarity (kept in e) and the read weights' gradient
    // (kept in c), which also reaches them through the reads and the usage.
    for (int64_t i = 0; i < R; ++i) {
      mm[i] = dot(m + i * W, m + i * W, W);
      for (int64_t h = 0; h < H; ++h) {
        e[h * R + i] = dot(k + h * W, m + i * W, W) / std::sqrt(kk[h] * mm[i] + b.eps);
        c[h * R + i] = b.g_wr[t * H * R + h * R + i] + gu[i] + dot(gr + h * W, m + i * W, W);
      }
    }
    // Softmax and cosine backward: c = g_sim / norm, e = g_sim sim / norm^2.
    for (int64_t h = 0; h < H; ++h) {
      const T mean = dot(w + h * R, c.data() + h * R, R);
      T key_scale = 0;
      for (int64_t i = 0; i < R; ++i) {
        const int64_t hi = h * R + i;
        const T norm2 = kk[h] * mm[i] + b.eps, g_sim = w[hi] * (c[hi] - mean);
        c[hi] = g_sim / std::sqrt(norm2);
        e[hi] = g_sim * e[hi] / norm2;
        key_scale += e[hi] * mm[i];
      }
      for (int64_t d = 0; d < W; ++d) g_keys[h * W + d] = -key_scale * k[h * W + d];
      g_gates[h] = 0;
    }
    std::fill(g_adds, g_adds + H * W, T(0));
    // Pass 2, per row: the new memory's gradient g_row, and through the write the
    // gradients of the adds, the write weights (previous read weights, gates), the old row.
    for (int64_t i = 0; i < R; ++i) {
      const T* mi = m + i * W;
      T row_scale = 0;
      for (int64_t h = 0; h < H; ++h) row_scale += e[h * R + i] * kk[h];
      const T* g_mem = b.g_mem + (t * R + i) * W;
#pragma omp simd
      for (int64_t d = 0; d < W; ++d) g_row[d] = g_mem[d] - row_scale * mi[d];
      for (int64_t h = 0; h < H; ++h) {
        axpy(w[h * R + i], gr + h * W, g_row.data(), W);
        axpy(c[h * R + i], k + h * W, g_row.data(), W);
        axpy(c[h * R + i], mi, g_keys + h * W, W);
      }
      for (int64_t h = 0; h < H; ++h) {
        const T g_ww = dot(a + h * W, g_row.data(), W) + gu[i];
        axpy(ww[h * R + i], g_row.data(), g_adds + h * W, W);
        b.o_wr_prev[t * H * R + h * R + i] = gates[h] * g_ww;
        g_gates[h] += g_ww * (wr_prev[h * R + i] - (i == lu[h] ? T(1) : T(0)));
      }
      T* out = b.o_mem + (t * R + i) * W;
      if (i == lu[0]) {
        std::fill(out, out + W, T(0));
      } else {
        std::copy(g_row.begin(), g_row.end(), out);
      }
      b.o_usage[t * R + i] = b.gamma * gu[i];
    }
  }
}

PYMETA_ISA_CLONES void backward_isa(const Sizes& s, const Backward<float>& b, int64_t begin, int64_t end) {
  backward_tasks(s, b, begin, end);
}
PYMETA_ISA_CLONES void backward_isa(const Sizes& s, const Backward<double>& b, int64_t begin, int64_t end) {
  backward_tasks(s, b, begin, end);
}

Sizes sizes_of(const at::Tensor& memory, const at::Tensor& keys) {
  TORCH_CHECK_VALUE(memory.dim() == 3 && keys.dim() == 3 && keys.size(0) == memory.size(0) &&
                        keys.size(2) == memory.size(2),
                    "memory must be [T, R, W] and keys [T, H, W], got shapes ", memory.sizes(), " and ",
                    keys.sizes());
  const Sizes s{memory.size(0), memory.size(1), memory.size(2), keys.size(1)};
  TORCH_CHECK_VALUE(s.H >= 1 && s.H <= s.R, "memory_access needs 1 <= H <= R, got H=", s.H, ", R=", s.R);
  return s;
}

// Checks the device and shape of x; returns it contiguous in the accumulation type (a
// no-op for contiguous float/double).
at::Tensor prepare(const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "the cpp backend runs on CPU tensors, got ", name, " on ", x.device());
  TORCH_CHECK_VALUE(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
  return x.to(at::toOpMathType(x.scalar_type())).contiguous();
}

// Grain 1: a task is a few hundred thousand flops.
constexpr int64_t kGrain = 1;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_access_cpu(
    const at::Tensor& memory_in, const at::Tensor& usage, const at::Tensor& read_weights, const at::Tensor& keys,
    const at::Tensor& adds, const at::Tensor& gates, double gamma, double eps) {
  const Sizes s = sizes_of(memory_in, keys);
  const at::Tensor memory = prepare(memory_in, "memory", {s.T, s.R, s.W}), u = prepare(usage, "usage", {s.T, s.R}),
                   wr = prepare(read_weights, "read_weights", {s.T, s.H, s.R}),
                   k = prepare(keys, "keys", {s.T, s.H, s.W}), a = prepare(adds, "adds", {s.T, s.H, s.W}),
                   g = prepare(gates, "gates", {s.T, s.H});
  at::Tensor reads = at::empty({s.T, s.H, s.W}, memory.options()), wr_out = at::empty_like(wr),
             mem_out = at::empty_like(memory), usage_out = at::empty_like(u),
             lu = at::empty({s.T, s.H}, memory.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(memory.scalar_type(), "memory_access_cpu", [&] {
    const Forward<scalar_t> f{memory.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                              wr.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                              a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                              static_cast<scalar_t>(gamma), static_cast<scalar_t>(eps),
                              reads.mutable_data_ptr<scalar_t>(), wr_out.mutable_data_ptr<scalar_t>(),
                              mem_out.mutable_data_ptr<scalar_t>(), usage_out.mutable_data_ptr<scalar_t>(),
                              lu.mutable_data_ptr<int64_t>()};
    at::parallel_for(0, s.T, kGrain, [&](int64_t begin, int64_t end) { forward_isa(s, f, begin, end); });
  });
  const auto dtype = memory_in.scalar_type();
  return {reads.to(dtype), wr_out.to(dtype), mem_out.to(dtype), usage_out.to(dtype), lu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_access_backward_cpu(
    const at::Tensor& g_reads, const at::Tensor& g_wr, const at::Tensor& g_mem, const at::Tensor& g_usage,
    const at::Tensor& wr_prev, const at::Tensor& keys, const at::Tensor& adds, const at::Tensor& gates,
    const at::Tensor& wr, const at::Tensor& mem, const at::Tensor& lu_in, double gamma, double eps) {
  const Sizes s = sizes_of(mem, keys);
  const at::Tensor gr = prepare(g_reads, "grad_reads", {s.T, s.H, s.W}),
                   gw = prepare(g_wr, "grad_read_weights", {s.T, s.H, s.R}),
                   gm = prepare(g_mem, "grad_memory", {s.T, s.R, s.W}), gu = prepare(g_usage, "grad_usage", {s.T, s.R}),
                   wp = prepare(wr_prev, "read_weights", {s.T, s.H, s.R}), k = prepare(keys, "keys", {s.T, s.H, s.W}),
                   a = prepare(adds, "adds", {s.T, s.H, s.W}), g = prepare(gates, "gates", {s.T, s.H}),
                   w = prepare(wr, "new_read_weights", {s.T, s.H, s.R}),
                   m = prepare(mem, "new_memory", {s.T, s.R, s.W});
  TORCH_CHECK_VALUE(lu_in.sizes() == at::IntArrayRef({s.T, s.H}), "least_used must have shape [", s.T, ", ", s.H,
                    "], got ", lu_in.sizes());
  const at::Tensor lu = lu_in.to(at::kLong).contiguous();
  at::Tensor o_mem = at::empty_like(m), o_usage = at::empty_like(gu), o_wr_prev = at::empty_like(wp),
             o_keys = at::empty_like(k), o_adds = at::empty_like(a), o_gates = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "memory_access_backward_cpu", [&] {
    const Backward<scalar_t> b{gr.const_data_ptr<scalar_t>(), gw.const_data_ptr<scalar_t>(),
                               gm.const_data_ptr<scalar_t>(), gu.const_data_ptr<scalar_t>(),
                               wp.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                               a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                               w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(),
                               lu.const_data_ptr<int64_t>(), static_cast<scalar_t>(gamma),
                               static_cast<scalar_t>(eps), o_mem.mutable_data_ptr<scalar_t>(),
                               o_usage.mutable_data_ptr<scalar_t>(), o_wr_prev.mutable_data_ptr<scalar_t>(),
                               o_keys.mutable_data_ptr<scalar_t>(), o_adds.mutable_data_ptr<scalar_t>(),
                               o_gates.mutable_data_ptr<scalar_t>()};
    at::parallel_for(0, s.T, kGrain, [&](int64_t begin, int64_t end) { backward_isa(s, b, begin, end); });
  });
  const auto dtype = mem.scalar_type();
  return {o_mem.to(dtype), o_usage.to(dtype), o_wr_prev.to(dtype), o_keys.to(dtype), o_adds.to(dtype),
          o_gates.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("memory_access(Tensor memory, Tensor usage, Tensor read_weights, Tensor keys, Tensor adds, Tensor gates, "
        "float gamma, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("memory_access_backward(Tensor grad_reads, Tensor grad_read_weights, Tensor grad_memory, Tensor grad_usage, "
        "Tensor read_weights, Tensor keys, Tensor adds, Tensor gates, Tensor new_read_weights, Tensor new_memory, "
        "Tensor least_used, float gamma, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("memory_access", &memory_access_cpu);
  m.impl("memory_access_backward", &memory_access_backward_cpu);
}
