// C++ CPU kernels of pymeta::relation_pairs (Relation Network pairs: broadcast sum,
// per-task BatchNorm, ReLU) and its backward. Math: pymeta/ops/relation_pairs.py.
//
// Layout (contiguous): classes a [T, N, C, HW], queries b [T, Q, C, HW], pairs
// [T, Q, N, C, HW]; weight, bias, running statistics [T, C].
// Statistics, per (task, channel), in closed form from the two sides, never from the
// Q * N pairs: with abar = mean_n a, bbar = mean_q b at each position,
//   mean = mean_hw(abar + bbar),
//   var  = mean_hw(var_n a + var_q b + (abar + bbar - mean)^2)   (exact: the cross terms vanish).
// Backward, per (task, channel), one pass over the incoming gradient g of the pairs:
//   gz = g * [z > 0], G_n = sum_q gz, H_q = sum_n gz, s1 = sum gz, s2 = sum gz * xhat;
// then (train mode, M = Q N HW)
//   grad a_n = w invstd (G_n - Q s1 / M - s2 / M * invstd (Q a_n + sum_q b_q - Q mean)),
//   grad b_q = w invstd (H_q - N s1 / M - s2 / M * invstd (sum_n a_n + N b_q - N mean)),
// (eval mode: w invstd G_n and w invstd H_q), grad weight = s2, grad bias = s1.
// Reductions over a task's pairs accumulate in double: they sum Q * N * HW terms.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

struct Sizes {
  int64_t T, N, Q, C, HW;
};

Sizes check_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK_TYPE(a.is_floating_point() && b.scalar_type() == a.scalar_type(),
                   "classes and queries must be floating-point tensors of one dtype, got ", a.scalar_type(), " and ",
                   b.scalar_type());
  TORCH_CHECK_VALUE(a.dim() == 5 && b.dim() == 5 && a.size(0) == b.size(0) && a.sizes().slice(2) == b.sizes().slice(2),
                    "classes must be [T, N, C, H, W] and queries [T, Q, C, H, W], got shapes ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_VALUE(a.device().is_cpu() && b.device().is_cpu(), "the cpp backend runs on CPU tensors, got ",
                    a.device());
  const Sizes s{a.size(0), a.size(1), b.size(1), a.size(2), a.size(3) * a.size(4)};
  for (const at::Tensor* p : {&weight, &bias}) {
    TORCH_CHECK_VALUE(p->dim() == 2 && p->size(0) == s.T && p->size(1) == s.C,
                      "weight and bias must be [T, C] = [", s.T, ", ", s.C, "], got shape ", p->sizes());
  }
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together or both be None");
  if (running_mean.has_value()) {
    for (const at::Tensor* p : {&*running_mean, &*running_var}) {
      TORCH_CHECK_VALUE(p->dim() == 2 && p->size(0) == s.T && p->size(1) == s.C,
                        "running statistics must be [T, C] = [", s.T, ", ", s.C, "], got shape ", p->sizes());
    }
  }
  return s;
}

// at::parallel_for grain: items per thread for about 32K elements of work each, so small
// calls run serially instead of paying for a parallel region.
int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_item, 1)); }

// [T, C] as contiguous doubles (the per-channel parameters are few).
std::vector<double> per_channel(const at::Tensor& p) {
  const at::Tensor d = p.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

// out[i] = sum_j x[t, j, c, i] over the `count` rows (classes or queries) of task t.
template <typename scalar_t>
void side_sums(const scalar_t* x, int64_t t, int64_t count, int64_t c, const Sizes& s, std::vector<double>& out) {
  std::fill(out.begin(), out.end(), 0.0);
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t* row = x + ((t * count + j) * s.C + c) * s.HW;
    for (int64_t i = 0; i < s.HW; ++i) out[i] += static_cast<double>(row[i]);
  }
}

// mean[t * C + c] and invstd[t * C + c]: batch statistics per task, or the running ones.
template <typename scalar_t>
void statistics(const scalar_t* a, const scalar_t* b, const Sizes& s, const std::optional<at::Tensor>& running_mean,
                const std::optional<at::Tensor>& running_var, double eps, std::vector<double>& mean,
                std::vector<double>& invstd) {
  mean.assign(s.T * s.C, 0.0);
  invstd.assign(s.T * s.C, 0.0);
  if (running_mean.has_value()) {
    const std::vector<double> rm = per_channel(*running_mean), rv = per_channel(*running_var);
    for (int64_t i = 0; i < s.T * s.C; ++i) {
      mean[i] = rm[i];
      invstd[i] = 1.0 / std::sqrt(rv[i] + eps);
    }
    return;
  }
  at::parallel_for(0, s.T * s.C, grain((s.N + s.Q) * s.HW), [&](int64_t begin, int64_t end) {
    std::vector<double> abar(s.HW), bbar(s.HW), spread(s.HW);
    for (int64_t tc = begin; tc < end; ++tc) {
      const int64_t t = tc / s.C, c = tc % s.C;
      side_sums(a, t, s.N, c, s, abar);
      side_sums(b, t, s.Q, c, s, bbar);
      std::fill(spread.begin(), spread.end(), 0.0);
      double total = 0.0;
      for (int64_t i = 0; i < s.HW; ++i) {
        abar[i] /= static_cast<double>(s.N);
        bbar[i] /= static_cast<double>(s.Q);
        total += abar[i] + bbar[i];
      }
      const double m = total / static_cast<double>(s.HW);
      for (int64_t n = 0; n < s.N; ++n) {
        const scalar_t* row = a + ((t * s.N + n) * s.C + c) * s.HW;
        for (int64_t i = 0; i < s.HW; ++i) {
          const double d = static_cast<double>(row[i]) - abar[i];
          spread[i] += d * d / static_cast<double>(s.N);
        }
      }
      for (int64_t q = 0; q < s.Q; ++q) {
        const scalar_t* row = b + ((t * s.Q + q) * s.C + c) * s.HW;
        for (int64_t i = 0; i < s.HW; ++i) {
          const double d = static_cast<double>(row[i]) - bbar[i];
          spread[i] += d * d / static_cast<double>(s.Q);
        }
      }
      double var = 0.0;
      for (int64_t i = 0; i < s.HW; ++i) {
        const double d = abar[i] + bbar[i] - m;
        var += spread[i] + d * d;
      }
      mean[tc] = m;
      invstd[tc] = 1.0 / std::sqrt(var / static_cast<double>(s.HW) + eps);
    }
  });
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& a_t, const at::Tensor& b_t, const std::vector<double>& weight,
                    const std::vector<double>& bias, const std::vector<double>& mean,
                    const std::vector<double>& invstd, const Sizes& s, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* a = a_t.const_data_ptr<scalar_t>();
  const scalar_t* b = b_t.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  // One (task, query, class) pair per iteration: C * HW contiguous outputs.
  at::parallel_for(0, s.T * s.Q * s.N, grain(s.C * s.HW), [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t t = pair / (s.Q * s.N), q = pair / s.N % s.Q, n = pair % s.N;
      for (int64_t c = 0; c < s.C; ++c) {
        const int64_t tc = t * s.C + c;
        const acc_t m = static_cast<acc_t>(mean[tc]), inv = static_cast<acc_t>(invstd[tc]);
        const acc_t w = static_cast<acc_t>(weight[tc]), beta = static_cast<acc_t>(bias[tc]);
        const scalar_t* ra = a + ((t * s.N + n) * s.C + c) * s.HW;
        const scalar_t* rb = b + ((t * s.Q + q) * s.C + c) * s.HW;
        scalar_t* ro = o + (pair * s.C + c) * s.HW;
#pragma omp simd
        for (int64_t i = 0; i < s.HW; ++i) {
          // The backward recomputes z in the same order, so both see the same ReLU mask.
          const acc_t z = (static_cast<acc_t>(ra[i]) + static_cast<acc_t>(rb[i]) - m) * inv * w + beta;
          ro[i] = static_cast<scalar_t>(z > acc_t(0) ? z : acc_t(0));
        }
      }
    }
  });
}

at::Tensor relation_pairs_cpu(const at::Tensor& classes, const at::Tensor& queries, const at::Tensor& weight,
                              const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
                              const std::optional<at::Tensor>& running_var, double eps) {
  const Sizes s = check_inputs(classes, queries, weight, bias, running_mean, running_var);
  const at::Tensor a = classes.contiguous(), b = queries.contiguous();
  at::Tensor out = at::empty({s.T, s.Q, s.N, classes.size(2), classes.size(3), classes.size(4)}, a.options());
  if (out.numel() == 0) return out;
  const std::vector<double> w = per_channel(weight), beta = per_channel(bias);
  std::vector<double> mean, invstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "relation_pairs_cpu", [&] {
    statistics<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), s, running_mean, running_var,
                         eps, mean, invstd);
    forward_kernel<scalar_t>(a, b, w, beta, mean, invstd, s, out);
  });
  return out;
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& g_t, const at::Tensor& a_t, const at::Tensor& b_t,
                     const std::vector<double>& weight, const std::vector<double>& bias,
                     const std::vector<double>& mean, const std::vector<double>& invstd, bool batch_stats,
                     const Sizes& s, at::Tensor& ga_t, at::Tensor& gb_t, std::vector<double>& s1,
                     std::vector<double>& s2) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = g_t.const_data_ptr<scalar_t>();
  const scalar_t* a = a_t.const_data_ptr<scalar_t>();
  const scalar_t* b = b_t.const_data_ptr<scalar_t>();
  scalar_t* ga = ga_t.mutable_data_ptr<scalar_t>();
  scalar_t* gb = gb_t.mutable_data_ptr<scalar_t>();
  const double M = static_cast<double>(s.Q * s.N * s.HW);
  at::parallel_for(0, s.T * s.C, grain(s.Q * s.N * s.HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> G(s.N * s.HW), H(s.Q * s.HW);
    std::vector<double> a_sum(s.HW), b_sum(s.HW);
    for (int64_t tc = begin; tc < end; ++tc) {
      const int64_t t = tc / s.C, c = tc % s.C;
      const acc_t m = static_cast<acc_t>(mean[tc]), inv = static_cast<acc_t>(invstd[tc]);
      const acc_t w = static_cast<acc_t>(weight[tc]), beta = static_cast<acc_t>(bias[tc]);
      std::fill(G.begin(), G.end(), acc_t(0));
      std::fill(H.begin(), H.end(), acc_t(0));
      double sum1 = 0.0, sum2 = 0.0;
      for (int64_t q = 0; q < s.Q; ++q) {
        const scalar_t* rb = b + ((t * s.Q + q) * s.C + c) * s.HW;
        acc_t* Hq = H.data() + q * s.HW;
        for (int64_t n = 0; n < s.N; ++n) {
          const scalar_t* ra = a + ((t * s.N + n) * s.C + c) * s.HW;
          const scalar_t* rg = g + (((t * s.Q + q) * s.N + n) * s.C + c) * s.HW;
          acc_t* Gn = G.data() + n * s.HW;
          acc_t part1 = 0, part2 = 0;
#pragma omp simd reduction(+ : part1, part2)
          for (int64_t i = 0; i < s.HW; ++i) {
            const acc_t x = (static_cast<acc_t>(ra[i]) + static_cast<acc_t>(rb[i]) - m) * inv;
            // Loaded whatever the mask: a load under the condition keeps the loop scalar.
            const acc_t gi = static_cast<acc_t>(rg[i]);
            const acc_t v = x * w + beta > acc_t(0) ? gi : acc_t(0);
            Gn[i] += v;
            Hq[i] += v;
            part1 += v;
            part2 += v * x;
          }
          sum1 += static_cast<double>(part1);
          sum2 += static_cast<double>(part2);
        }
      }
      s1[tc] = sum1;
      s2[tc] = sum2;
      const double k = static_cast<double>(w) * static_cast<double>(inv);
      if (!batch_stats) {  // eval mode: the statistics are constants
        for (int64_t n = 0; n < s.N; ++n) {
          scalar_t* dst = ga + ((t * s.N + n) * s.C + c) * s.HW;
          for (int64_t i = 0; i < s.HW; ++i) dst[i] = static_cast<scalar_t>(k * G[n * s.HW + i]);
        }
        for (int64_t q = 0; q < s.Q; ++q) {
          scalar_t* dst = gb + ((t * s.Q + q) * s.C + c) * s.HW;
          for (int64_t i = 0; i < s.HW; ++i) dst[i] = static_cast<scalar_t>(k * H[q * s.HW + i]);
        }
        continue;
      }
      // Train mode: subtract the gradient through the task's mean and variance.
      const double mu1 = sum1 / M, mu2 = sum2 / M, md = mean[tc], id = invstd[tc];
      side_sums(a, t, s.N, c, s, a_sum);
      side_sums(b, t, s.Q, c, s, b_sum);
      const double Qd = static_cast<double>(s.Q), Nd = static_cast<double>(s.N);
      for (int64_t n = 0; n < s.N; ++n) {
        const scalar_t* ra = a + ((t * s.N + n) * s.C + c) * s.HW;
        scalar_t* dst = ga + ((t * s.N + n) * s.C + c) * s.HW;
        for (int64_t i = 0; i < s.HW; ++i) {
          const double xs = id * (Qd * (static_cast<double>(ra[i]) - md) + b_sum[i]);  // sum_q xhat
          dst[i] = static_cast<scalar_t>(k * (static_cast<double>(G[n * s.HW + i]) - Qd * mu1 - mu2 * xs));
        }
      }
      for (int64_t q = 0; q < s.Q; ++q) {
        const scalar_t* rb = b + ((t * s.Q + q) * s.C + c) * s.HW;
        scalar_t* dst = gb + ((t * s.Q + q) * s.C + c) * s.HW;
        for (int64_t i = 0; i < s.HW; ++i) {
          const double xs = id * (a_sum[i] + Nd * (static_cast<double>(rb[i]) - md));  // sum_n xhat
          dst[i] = static_cast<scalar_t>(k * (static_cast<double>(H[q * s.HW + i]) - Nd * mu1 - mu2 * xs));
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relation_pairs_backward_cpu(
    const at::Tensor& grad, const at::Tensor& classes, const at::Tensor& queries, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double eps) {
  const Sizes s = check_inputs(classes, queries, weight, bias, running_mean, running_var);
  TORCH_CHECK_VALUE(grad.dim() == 6 && grad.size(0) == s.T && grad.size(1) == s.Q && grad.size(2) == s.N &&
                        grad.sizes().slice(3) == classes.sizes().slice(2),
                    "grad must be [T, Q, N, C, H, W], got shape ", grad.sizes());
  const at::Tensor a = classes.contiguous(), b = queries.contiguous();
  const at::Tensor g = grad.to(a.scalar_type()).contiguous();
  at::Tensor ga = at::empty(a.sizes(), a.options()), gb = at::empty(b.sizes(), b.options());
  std::vector<double> s1(s.T * s.C, 0.0), s2(s.T * s.C, 0.0);
  if (ga.numel() > 0 && gb.numel() > 0) {
    const std::vector<double> w = per_channel(weight), beta = per_channel(bias);
    std::vector<double> mean, invstd;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "relation_pairs_backward_cpu", [&] {
      statistics<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), s, running_mean, running_var,
                           eps, mean, invstd);
      backward_kernel<scalar_t>(g, a, b, w, beta, mean, invstd, !running_mean.has_value(), s, ga, gb, s1, s2);
    });
  } else {
    ga.zero_();
    gb.zero_();
  }
  const auto as_param = [&](const std::vector<double>& v, const at::Tensor& like) {
    return at::tensor(v, at::TensorOptions().dtype(at::kDouble)).view({s.T, s.C}).to(like.scalar_type());
  };
  return {ga, gb, as_param(s2, weight), as_param(s1, bias)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def(
      "relation_pairs(Tensor classes, Tensor queries, Tensor weight, Tensor bias, Tensor? running_mean, "
      "Tensor? running_var, float eps) -> Tensor");
  m.def(
      "relation_pairs_backward(Tensor grad, Tensor classes, Tensor queries, Tensor weight, Tensor bias, "
      "Tensor? running_mean, Tensor? running_var, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("relation_pairs", &relation_pairs_cpu);
  m.impl("relation_pairs_backward", &relation_pairs_backward_cpu);
}
