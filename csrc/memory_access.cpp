// C++ CPU kernels of pymeta::memory_access (one MANN step: LRU write, cosine reads) and
// its fused backward. The formulas are in pymeta/ops/memory_access.py.
//
// A MANN step is tiny (a few hundred thousand flops for 16 tasks with a 128 x 40 memory):
// on CPU its cost is the number of ATen calls, about 25 in the composite forward and 50 in
// its backward. Here each direction is one call; tasks run in parallel (at::parallel_for),
// each task's work in a single pass per phase over its own rows. Half and bfloat16 are
// computed in float (their at::opmath_type) and rounded once when stored.
//
// Least-used rows: H passes of argmin over the rows not yet chosen, the first (lowest)
// index winning ties: the first H entries of a stable ascending sort, as the reference.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

// The H least-used rows of u [R], ascending, ties to the lowest index.
template <typename scalar_t>
void least_used(const scalar_t* u, int64_t R, int64_t H, int64_t* lu) {
  std::vector<char> chosen(R, 0);
  for (int64_t h = 0; h < H; ++h) {
    int64_t best = -1;
    for (int64_t i = 0; i < R; ++i) {
      if (!chosen[i] && (best < 0 || u[i] < u[best])) best = i;
    }
    lu[h] = best;
    chosen[best] = 1;
  }
}

// ww[h, i] = g_h * wr_prev[h, i] + (1 - g_h) [i == lu_h]
template <typename scalar_t, typename acc_t>
void write_weights(const scalar_t* wr_prev, const scalar_t* gates, const int64_t* lu, int64_t H, int64_t R,
                   acc_t* ww) {
  for (int64_t h = 0; h < H; ++h) {
    const acc_t g = static_cast<acc_t>(gates[h]);
    for (int64_t i = 0; i < R; ++i) ww[h * R + i] = g * static_cast<acc_t>(wr_prev[h * R + i]);
    ww[h * R + lu[h]] += acc_t(1) - g;
  }
}

template <typename acc_t>
acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += x[d] * y[d];
  return s;
}

// Cosine similarities of the keys k [H, W] with the memory rows m [R, W]:
// sim = k.m / norm, norm = sqrt(|k|^2 |m|^2 + eps); kk [H], mm [R], norm and sim [H, R].
template <typename acc_t>
void cosine(const acc_t* k, const acc_t* m, int64_t H, int64_t R, int64_t W, acc_t eps, acc_t* kk, acc_t* mm,
            acc_t* norm, acc_t* sim) {
  for (int64_t h = 0; h < H; ++h) kk[h] = dot(k + h * W, k + h * W, W);
  for (int64_t i = 0; i < R; ++i) mm[i] = dot(m + i * W, m + i * W, W);
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < R; ++i) {
      const int64_t hi = h * R + i;
      norm[hi] = std::sqrt(kk[h] * mm[i] + eps);
      sim[hi] = dot(k + h * W, m + i * W, W) / norm[hi];
    }
  }
}

template <typename scalar_t, typename acc_t>
void load(const scalar_t* src, int64_t n, acc_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
}

template <typename scalar_t, typename acc_t>
void store(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

struct Sizes {
  int64_t T, R, W, H;
};

Sizes sizes_of(const at::Tensor& memory, const at::Tensor& keys) {
  TORCH_CHECK_VALUE(memory.dim() == 3 && keys.dim() == 3 && keys.size(0) == memory.size(0) &&
                        keys.size(2) == memory.size(2),
                    "memory must be [T, R, W] and keys [T, H, W], got shapes ", memory.sizes(), " and ",
                    keys.sizes());
  TORCH_CHECK_VALUE(memory.device().is_cpu(), "the cpp backend runs on CPU tensors, got tensors on ", memory.device());
  const Sizes s{memory.size(0), memory.size(1), memory.size(2), keys.size(1)};
  TORCH_CHECK_VALUE(s.H >= 1 && s.H <= s.R, "memory_access needs 1 <= H <= R, got H=", s.H, ", R=", s.R);
  return s;
}

void check_shape(const at::Tensor& x, const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(x.sizes() == shape, name, " must have shape ", shape, ", got ", x.sizes());
}

template <typename scalar_t>
void forward_kernel(const Sizes& s, const scalar_t* memory, const scalar_t* usage, const scalar_t* wr_prev,
                    const scalar_t* keys, const scalar_t* adds, const scalar_t* gates, double gamma, double eps,
                    scalar_t* reads, scalar_t* wr_out, scalar_t* mem_out, scalar_t* usage_out, int64_t* lu_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = s.R, W = s.W, H = s.H;
  at::parallel_for(0, s.T, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ww(H * R), m(R * W), k(H * W), kk(H), mm(R), norm(H * R), w(H * R);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t* lu = lu_out + t * H;
      least_used(usage + t * R, R, H, lu_out + t * H);
      write_weights(wr_prev + t * H * R, gates + t * H, lu, H, R, ww.data());
      // The least-used row is zeroed, then every head adds ww[h, i] * adds[h].
      load(memory + t * R * W, R * W, m.data());
      std::fill(m.begin() + lu[0] * W, m.begin() + (lu[0] + 1) * W, acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* a = adds + (t * H + h) * W;
        for (int64_t i = 0; i < R; ++i) {
          const acc_t c = ww[h * R + i];
          acc_t* row = m.data() + i * W;
          for (int64_t d = 0; d < W; ++d) row[d] += c * static_cast<acc_t>(a[d]);
        }
      }
      load(keys + t * H * W, H * W, k.data());
      cosine(k.data(), m.data(), H, R, W, static_cast<acc_t>(eps), kk.data(), mm.data(), norm.data(), w.data());
      for (int64_t h = 0; h < H; ++h) {  // softmax over rows, in place
        acc_t* row = w.data() + h * R;
        acc_t top = row[0], sum = 0;
        for (int64_t i = 1; i < R; ++i) top = std::max(top, row[i]);
        for (int64_t i = 0; i < R; ++i) sum += (row[i] = std::exp(row[i] - top));
        for (int64_t i = 0; i < R; ++i) row[i] /= sum;
      }
      for (int64_t h = 0; h < H; ++h) {
        std::vector<acc_t> r(W, acc_t(0));
        for (int64_t i = 0; i < R; ++i) {
          const acc_t c = w[h * R + i];
          for (int64_t d = 0; d < W; ++d) r[d] += c * m[i * W + d];
        }
        store(r.data(), W, reads + (t * H + h) * W);
      }
      for (int64_t i = 0; i < R; ++i) {
        acc_t u = static_cast<acc_t>(gamma) * static_cast<acc_t>(usage[t * R + i]);
        for (int64_t h = 0; h < H; ++h) u += w[h * R + i] + ww[h * R + i];
        usage_out[t * R + i] = static_cast<scalar_t>(u);
      }
      store(w.data(), H * R, wr_out + t * H * R);
      store(m.data(), R * W, mem_out + t * R * W);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_access_cpu(
    const at::Tensor& memory_in, const at::Tensor& usage_in, const at::Tensor& wr_in, const at::Tensor& keys_in,
    const at::Tensor& adds_in, const at::Tensor& gates_in, double gamma, double eps) {
  const Sizes s = sizes_of(memory_in, keys_in);
  check_shape(usage_in, "usage", {s.T, s.R});
  check_shape(wr_in, "read_weights", {s.T, s.H, s.R});
  check_shape(adds_in, "adds", {s.T, s.H, s.W});
  check_shape(gates_in, "gates", {s.T, s.H});
  const at::Tensor memory = memory_in.contiguous(), usage = usage_in.contiguous(), wr = wr_in.contiguous(),
                   keys = keys_in.contiguous(), adds = adds_in.contiguous(), gates = gates_in.contiguous();
  at::Tensor reads = at::empty({s.T, s.H, s.W}, memory.options()), wr_out = at::empty_like(wr),
             mem_out = at::empty_like(memory), usage_out = at::empty_like(usage),
             lu = at::empty({s.T, s.H}, memory.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "memory_access_cpu", [&] {
    forward_kernel<scalar_t>(s, memory.const_data_ptr<scalar_t>(), usage.const_data_ptr<scalar_t>(),
                             wr.const_data_ptr<scalar_t>(), keys.const_data_ptr<scalar_t>(),
                             adds.const_data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(), gamma, eps,
                             reads.mutable_data_ptr<scalar_t>(), wr_out.mutable_data_ptr<scalar_t>(),
                             mem_out.mutable_data_ptr<scalar_t>(), usage_out.mutable_data_ptr<scalar_t>(),
                             lu.mutable_data_ptr<int64_t>());
  });
  return {reads, wr_out, mem_out, usage_out, lu};
}

struct BackwardIn {
  const void *g_reads, *g_wr, *g_mem, *g_usage, *wr_prev, *keys, *adds, *gates, *wr, *mem;
  const int64_t* lu;
};

struct BackwardOut {
  void *g_mem, *g_usage, *g_wr_prev, *g_keys, *g_adds, *g_gates;
};

template <typename scalar_t>
void backward_kernel(const Sizes& s, const BackwardIn& in, const BackwardOut& out, double gamma, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = s.R, W = s.W, H = s.H;
  auto ptr = [](const void* p) { return static_cast<const scalar_t*>(p); };
  auto mut = [](void* p) { return static_cast<scalar_t*>(p); };
  at::parallel_for(0, s.T, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ww(H * R), m(R * W), k(H * W), kk(H), mm(R), norm(H * R), sim(H * R), gr(H * W), w(H * R),
        c(H * R), e(H * R), gm(R * W), gw(H * R), ga(H * W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t* lu = in.lu + t * H;
      const scalar_t* gu = ptr(in.g_usage) + t * R;
      const scalar_t* wr_prev = ptr(in.wr_prev) + t * H * R;
      write_weights(wr_prev, ptr(in.gates) + t * H, lu, H, R, ww.data());
      load(ptr(in.mem) + t * R * W, R * W, m.data());
      load(ptr(in.keys) + t * H * W, H * W, k.data());
      load(ptr(in.g_reads) + t * H * W, H * W, gr.data());
      load(ptr(in.wr) + t * H * R, H * R, w.data());
      cosine(k.data(), m.data(), H, R, W, static_cast<acc_t>(eps), kk.data(), mm.data(), norm.data(), sim.data());
      for (int64_t h = 0; h < H; ++h) {
        // The new read weights feed the reads, the usage and the output.
        acc_t* g_weights = gw.data() + h * R;
        acc_t mean = 0;
        for (int64_t i = 0; i < R; ++i) {
          g_weights[i] = static_cast<acc_t>(ptr(in.g_wr)[(t * H + h) * R + i]) + static_cast<acc_t>(gu[i]) +
                         dot(gr.data() + h * W, m.data() + i * W, W);
          mean += w[h * R + i] * g_weights[i];
        }
        acc_t key_scale = 0;
        for (int64_t i = 0; i < R; ++i) {
          const int64_t hi = h * R + i;
          const acc_t g_sim = w[hi] * (g_weights[i] - mean);
          c[hi] = g_sim / norm[hi];
          e[hi] = g_sim * sim[hi] / (norm[hi] * norm[hi]);
          key_scale += e[hi] * mm[i];
        }
        std::vector<acc_t> gk(W);
        for (int64_t d = 0; d < W; ++d) gk[d] = -k[h * W + d] * key_scale;
        for (int64_t i = 0; i < R; ++i) {
          for (int64_t d = 0; d < W; ++d) gk[d] += c[h * R + i] * m[i * W + d];
        }
        store(gk.data(), W, mut(out.g_keys) + (t * H + h) * W);
      }
      // Gradient of the written memory.
      for (int64_t i = 0; i < R; ++i) {
        acc_t row_scale = 0;
        for (int64_t h = 0; h < H; ++h) row_scale += e[h * R + i] * kk[h];
        acc_t* row = gm.data() + i * W;
        const scalar_t* g_mem = ptr(in.g_mem) + (t * R + i) * W;
        for (int64_t d = 0; d < W; ++d) row[d] = static_cast<acc_t>(g_mem[d]) - m[i * W + d] * row_scale;
        for (int64_t h = 0; h < H; ++h) {
          const acc_t wi = w[h * R + i], ci = c[h * R + i];
          for (int64_t d = 0; d < W; ++d) row[d] += wi * gr[h * W + d] + ci * k[h * W + d];
        }
      }
      // Through the write: adds, write weights (-> previous read weights, gates), old memory.
      std::fill(ga.begin(), ga.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        std::vector<acc_t> a(W);
        load(ptr(in.adds) + (t * H + h) * W, W, a.data());
        const acc_t g = static_cast<acc_t>(ptr(in.gates)[t * H + h]);
        acc_t g_gate = 0;
        for (int64_t i = 0; i < R; ++i) {
          const acc_t g_ww = dot(a.data(), gm.data() + i * W, W) + static_cast<acc_t>(gu[i]);
          for (int64_t d = 0; d < W; ++d) ga[h * W + d] += ww[h * R + i] * gm[i * W + d];
          mut(out.g_wr_prev)[(t * H + h) * R + i] = static_cast<scalar_t>(g * g_ww);
          g_gate += g_ww * (static_cast<acc_t>(wr_prev[h * R + i]) - (i == lu[h] ? acc_t(1) : acc_t(0)));
        }
        mut(out.g_gates)[t * H + h] = static_cast<scalar_t>(g_gate);
      }
      store(ga.data(), H * W, mut(out.g_adds) + t * H * W);
      std::fill(gm.begin() + lu[0] * W, gm.begin() + (lu[0] + 1) * W, acc_t(0));
      store(gm.data(), R * W, mut(out.g_mem) + t * R * W);
      for (int64_t i = 0; i < R; ++i) {
        mut(out.g_usage)[t * R + i] = static_cast<scalar_t>(static_cast<acc_t>(gamma) * static_cast<acc_t>(gu[i]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_access_backward_cpu(
    const at::Tensor& g_reads, const at::Tensor& g_wr, const at::Tensor& g_mem, const at::Tensor& g_usage,
    const at::Tensor& wr_prev, const at::Tensor& keys, const at::Tensor& adds, const at::Tensor& gates,
    const at::Tensor& wr, const at::Tensor& mem, const at::Tensor& lu_in, double gamma, double eps) {
  const Sizes s = sizes_of(mem, keys);
  check_shape(g_reads, "grad_reads", {s.T, s.H, s.W});
  check_shape(g_wr, "grad_read_weights", {s.T, s.H, s.R});
  check_shape(g_mem, "grad_memory", {s.T, s.R, s.W});
  check_shape(g_usage, "grad_usage", {s.T, s.R});
  check_shape(wr_prev, "read_weights", {s.T, s.H, s.R});
  check_shape(adds, "adds", {s.T, s.H, s.W});
  check_shape(gates, "gates", {s.T, s.H});
  check_shape(wr, "new_read_weights", {s.T, s.H, s.R});
  check_shape(lu_in, "least_used", {s.T, s.H});
  std::vector<at::Tensor> c;  // contiguous copies (no-ops when already contiguous)
  for (const at::Tensor* x : {&g_reads, &g_wr, &g_mem, &g_usage, &wr_prev, &keys, &adds, &gates, &wr, &mem}) {
    c.push_back(x->contiguous());
  }
  const at::Tensor lu = lu_in.to(at::kLong).contiguous();
  const auto options = mem.options();
  at::Tensor g_memory = at::empty({s.T, s.R, s.W}, options), g_u = at::empty({s.T, s.R}, options),
             g_wr_prev = at::empty({s.T, s.H, s.R}, options), g_keys = at::empty({s.T, s.H, s.W}, options),
             g_adds = at::empty({s.T, s.H, s.W}, options), g_gates = at::empty({s.T, s.H}, options);
  const BackwardIn in{c[0].const_data_ptr(), c[1].const_data_ptr(), c[2].const_data_ptr(), c[3].const_data_ptr(),
                      c[4].const_data_ptr(), c[5].const_data_ptr(), c[6].const_data_ptr(), c[7].const_data_ptr(),
                      c[8].const_data_ptr(), c[9].const_data_ptr(), lu.const_data_ptr<int64_t>()};
  const BackwardOut out{g_memory.mutable_data_ptr(), g_u.mutable_data_ptr(),    g_wr_prev.mutable_data_ptr(),
                        g_keys.mutable_data_ptr(),   g_adds.mutable_data_ptr(), g_gates.mutable_data_ptr()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mem.scalar_type(), "memory_access_backward_cpu",
                                  [&] { backward_kernel<scalar_t>(s, in, out, gamma, eps); });
  return {g_memory, g_u, g_wr_prev, g_keys, g_adds, g_gates};
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
