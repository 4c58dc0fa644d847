// C++ CPU kernels of pymeta::batch_norm_relu_pool (BatchNorm, ReLU and 2x2 max-pooling
// of conv4's blocks in one pass), its backward and double backward; the forward and
// backward loops are in batch_norm_relu_pool.h. Math: pymeta/ops/batch_norm_relu_pool.py.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "batch_norm_relu_pool.h"

namespace pymeta {
namespace {

// ---- Double backward: the vjp of the backward (pymeta/ops/batch_norm_relu_pool.py,
// reference_double_backward, has the math). Inputs a = gg_x [B, C, H, W], gg_weight and
// gg_bias [C]; per channel, with d = x - mean, gz = grad where out > 0 routed to the
// choices and t = 1/M (train) or 0 (eval):
//   sums      Sg = sum gz, Sgd = sum gz d[choice], Sga = sum gz a[choice], Sa = sum a, Sad = sum a d
//   d x       = A d + K0 + K1 a + [choice] K2 gz
//   d grad    = [out > 0] (P a + Q d + R) at the choice
//   d weight  = s (Sga - t (Sa Sg + Sax Sgx)), with Sgx = s Sgd, Sax = s Sad
// (A, K0, K1, K2, P, Q, R: DoubleBackwardCoefficients). Like the backward, a first pass
// over the channel's planes takes the sums and a second writes both gradients.

struct DoubleBackwardSums {
  double g = 0, gd = 0, ga = 0, a = 0, ad = 0;
};

// The window sums of one window: (gz, gz * (x[choice] - mean), gz * a[choice]), counted
// 0 before `from` (a chunk's overlap).
template <int UP, typename T>
PYMETA_INLINE void double_window_sums(const T* r0, const T* r1, const T* a0, const T* a1, const T* g, const T* o,
                                      int64_t ow, int64_t from, T mean, T& sum_g, T& sum_gd, T& sum_ga) {
  const T x0 = r0[2 * ow], x1 = r0[2 * ow + 1], x2 = r1[2 * ow], x3 = r1[2 * ow + 1];
  const T y0 = a0[2 * ow], y1 = a0[2 * ow + 1], y2 = a1[2 * ow], y3 = a1[2 * ow + 1];
  const T best = window_best<UP>(r0, r1, ow);
  bool e0, e1, e2, e3;
  window_choice<UP>(x0, x1, x2, x3, best, e0, e1, e2, e3);
  // Exactly one flag is set: a sum of selects, which vectorises where a chain of
  // conditional loads (e0 ? a0[..] : e1 ? ...) ran scalar (double backward 4x slower).
  const T a_choice = (e0 ? y0 : T(0)) + (e1 ? y1 : T(0)) + (e2 ? y2 : T(0)) + (e3 ? y3 : T(0));
  const T gv = g[ow];
  const T gz = (o[ow] > 0) & (ow >= from) ? gv : T(0);
  sum_g += gz;
  sum_gd += gz * (best - mean);
  sum_ga += gz * a_choice;
}

template <int CH, int UP, typename T>
PYMETA_INLINE void double_backward_sums_plane(const T* grad, const T* x, const T* out, const T* gg_x, const Shape& s,
                                              T mean, DoubleBackwardSums& sums) {
  T sum_g = 0, sum_gd = 0, sum_ga = 0;
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const T* r0 = x + 2 * oh * s.W;
    const T* r1 = r0 + s.W;
    const T* a0 = gg_x + 2 * oh * s.W;
    const T* a1 = a0 + s.W;
    const T* g = grad + oh * s.OW;
    const T* o = out + oh * s.OW;
    if constexpr (CH == 0) {
#pragma omp simd reduction(+ : sum_g, sum_gd, sum_ga)
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        double_window_sums<UP>(r0, r1, a0, a1, g, o, ow, 0, mean, sum_g, sum_gd, sum_ga);
      }
    } else {
      for (int64_t start = 0; start < s.OW; start += CH) {
        const int64_t first = chunk_first<CH>(start, s.OW);
#pragma omp simd reduction(+ : sum_g, sum_gd, sum_ga)
        for (int64_t k = 0; k < CH; ++k) {
          double_window_sums<UP>(r0, r1, a0, a1, g, o, first + k, start, mean, sum_g, sum_gd, sum_ga);
        }
      }
    }
  }
  T acc_a[kLanes] = {}, acc_ad[kLanes] = {};
  const int64_t n = s.plane();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      acc_a[k] += gg_x[i + k];
      acc_ad[k] += gg_x[i + k] * (x[i + k] - mean);
    }
  }
  double plane_a = 0, plane_ad = 0;
  for (int k = 0; k < kLanes; ++k) {
    plane_a += acc_a[k];
    plane_ad += acc_ad[k];
  }
  for (; i < n; ++i) {
    plane_a += gg_x[i];
    plane_ad += double(gg_x[i]) * double(x[i] - mean);
  }
  sums.g += sum_g;
  sums.gd += double(sum_gd);
  sums.ga += sum_ga;
  sums.a += plane_a;
  sums.ad += plane_ad;
}

template <typename T>
struct DoubleBackwardCoefficients {
  T A, K0, K1, K2, P, Q, R;
};

// The coefficients of d x and d grad, and d weight, from a channel's sums (see above).
template <typename T>
PYMETA_INLINE DoubleBackwardCoefficients<T> double_backward_coefficients(const DoubleBackwardSums& S, double w,
                                                                        double invstd, double gg_w, double gg_b,
                                                                        double t, double* d_weight) {
  const double s = invstd, Sgx = s * S.gd, Sax = s * S.ad;
  *d_weight = s * (S.ga - t * (S.a * S.g + Sax * Sgx));
  const double ws2t = w * s * s * t;
  return {
      T(s * (ws2t * (t * S.a * S.g - S.ga + 3 * t * Sgx * Sax) - gg_w * s * t * Sgx)),  // A (on d = xhat / s)
      T(ws2t * t * (Sax * S.g + Sgx * S.a) - gg_w * s * t * S.g),                       // K0
      T(-ws2t * Sgx),                                                                   // K1
      T(gg_w * s - ws2t * Sax),                                                         // K2
      T(w * s),                                                                         // P
      T(s * (gg_w - w * s * t * Sax)),                                                  // Q
      T(gg_b - w * s * t * S.a),                                                        // R
  };
}

// d x and d grad of one window.
template <int UP, typename T>
PYMETA_INLINE void double_backward_window(const T* __restrict r0, const T* __restrict r1, const T* __restrict a0,
                                          const T* __restrict a1, const T* __restrict g, const T* __restrict o,
                                          T* __restrict q0, T* __restrict q1, T* __restrict dg, int64_t ow, T mean,
                                          const DoubleBackwardCoefficients<T> k) {
  const T x0 = r0[2 * ow], x1 = r0[2 * ow + 1], x2 = r1[2 * ow], x3 = r1[2 * ow + 1];
  const T y0 = a0[2 * ow], y1 = a0[2 * ow + 1], y2 = a1[2 * ow], y3 = a1[2 * ow + 1];
  const T best = window_best<UP>(r0, r1, ow);
  bool e0, e1, e2, e3;
  window_choice<UP>(x0, x1, x2, x3, best, e0, e1, e2, e3);
  const bool live = o[ow] > 0;
  const T gv = g[ow];
  const T routed = live ? k.K2 * gv : T(0);
  q0[2 * ow] = k.A * (x0 - mean) + k.K0 + k.K1 * y0 + (e0 ? routed : T(0));
  q0[2 * ow + 1] = k.A * (x1 - mean) + k.K0 + k.K1 * y1 + (e1 ? routed : T(0));
  q1[2 * ow] = k.A * (x2 - mean) + k.K0 + k.K1 * y2 + (e2 ? routed : T(0));
  q1[2 * ow + 1] = k.A * (x3 - mean) + k.K0 + k.K1 * y3 + (e3 ? routed : T(0));
  const T a_choice = (e0 ? y0 : T(0)) + (e1 ? y1 : T(0)) + (e2 ? y2 : T(0)) + (e3 ? y3 : T(0));
  dg[ow] = live ? k.P * a_choice + k.Q * (best - mean) + k.R : T(0);
}

template <int CH, int UP, typename T>
PYMETA_INLINE void double_backward_plane(const T* __restrict grad, const T* __restrict x, const T* __restrict out,
                                         const T* __restrict gg_x, T* __restrict dx, T* __restrict dgrad,
                                         const Shape& s, T mean, const DoubleBackwardCoefficients<T> k) {
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t row = 2 * oh * s.W;
    const T *r0 = x + row, *r1 = r0 + s.W, *a0 = gg_x + row, *a1 = a0 + s.W;
    T *q0 = dx + row, *q1 = q0 + s.W, *dg = dgrad + oh * s.OW;
    const T* g = grad + oh * s.OW;
    const T* o = out + oh * s.OW;
    if constexpr (CH == 0) {
#pragma omp simd
      for (int64_t ow = 0; ow < s.OW; ++ow) double_backward_window<UP>(r0, r1, a0, a1, g, o, q0, q1, dg, ow, mean, k);
    } else {
      for (int64_t start = 0; start < s.OW; start += CH) {
        const int64_t first = chunk_first<CH>(start, s.OW);
#pragma omp simd
        for (int64_t i = 0; i < CH; ++i) {
          double_backward_window<UP>(r0, r1, a0, a1, g, o, q0, q1, dg, first + i, mean, k);
        }
      }
    }
    if (s.W % 2) {
      q0[s.W - 1] = k.A * (r0[s.W - 1] - mean) + k.K0 + k.K1 * a0[s.W - 1];
      q1[s.W - 1] = k.A * (r1[s.W - 1] - mean) + k.K0 + k.K1 * a1[s.W - 1];
    }
  }
  if (s.H % 2) {
    for (int64_t j = (s.H - 1) * s.W; j < s.plane(); ++j) dx[j] = k.A * (x[j] - mean) + k.K0 + k.K1 * gg_x[j];
  }
}

template <int UP, typename T>
PYMETA_INLINE void double_backward_channel_dir(const T* gg_x, const T* gg_w, const T* gg_b, const T* grad, const T* x,
                                               const T* out, T* dgrad, T* dx, double* dw, const Shape& s, int64_t c,
                                               double w, double mean, double invstd, bool train) {
  with_chunk_length(s.OW, [&](auto ch) PYMETA_LAMBDA_INLINE {
    constexpr int CH = decltype(ch)::value;
    DoubleBackwardSums sums;
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t o = (b * s.C + c) * s.out_plane(), i = (b * s.C + c) * s.plane();
      double_backward_sums_plane<CH, UP>(grad + o, x + i, out + o, gg_x + i, s, T(mean), sums);
    }
    const double t = train ? 1.0 / double(s.B * s.plane()) : 0.0;
    const auto k = double_backward_coefficients<T>(sums, w, invstd, double(gg_w[c]), double(gg_b[c]), t, dw);
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t o = (b * s.C + c) * s.out_plane(), i = (b * s.C + c) * s.plane();
      double_backward_plane<CH, UP>(grad + o, x + i, out + o, gg_x + i, dx + i, dgrad + o, s, T(mean), k);
    }
  });
}

template <typename T>
PYMETA_INLINE void double_backward_channel(const T* gg_x, const T* gg_w, const T* gg_b, const T* grad, const T* x,
                                           const T* out, T* dgrad, T* dx, double* dw, const Shape& s, int64_t c,
                                           const T* weight, const T* running_mean, const T* running_var, double eps) {
  const auto [mean, invstd] = channel_statistics(x, s, c, running_mean, running_var, eps);
  const double w = double(weight[c]), scale = w * invstd;
  const bool train = running_mean == nullptr;
  if (scale > 0) {
    double_backward_channel_dir<1>(gg_x, gg_w, gg_b, grad, x, out, dgrad, dx, dw, s, c, w, mean, invstd, train);
  } else if (scale < 0) {
    double_backward_channel_dir<-1>(gg_x, gg_w, gg_b, grad, x, out, dgrad, dx, dw, s, c, w, mean, invstd, train);
  } else {
    double_backward_channel_dir<0>(gg_x, gg_w, gg_b, grad, x, out, dgrad, dx, dw, s, c, w, mean, invstd, train);
  }
}

// Multiversioned entry points (multiversion.h).
PYMETA_MULTIVERSION void forward_channel_float(const float* x, float* out, const Shape& s, int64_t c, const float* w,
                                               const float* b, const float* rm, const float* rv, double eps) {
  forward_channel(x, out, s, c, w, b, rm, rv, eps);
}
PYMETA_MULTIVERSION void forward_channel_double(const double* x, double* out, const Shape& s, int64_t c,
                                                const double* w, const double* b, const double* rm, const double* rv,
                                                double eps) {
  forward_channel(x, out, s, c, w, b, rm, rv, eps);
}
inline void forward_channel_any(const float* x, float* out, const Shape& s, int64_t c, const float* w, const float* b,
                                const float* rm, const float* rv, double eps) {
  forward_channel_float(x, out, s, c, w, b, rm, rv, eps);
}
inline void forward_channel_any(const double* x, double* out, const Shape& s, int64_t c, const double* w,
                                const double* b, const double* rm, const double* rv, double eps) {
  forward_channel_double(x, out, s, c, w, b, rm, rv, eps);
}

PYMETA_MULTIVERSION void backward_channel_float(const float* grad, const float* x, const float* out, float* gx,
                                                double* gw, double* gb, const Shape& s, int64_t c, const float* w,
                                                const float* rm, const float* rv, double eps) {
  backward_channel(grad, x, out, gx, gw, gb, s, c, w, rm, rv, eps);
}
PYMETA_MULTIVERSION void backward_channel_double(const double* grad, const double* x, const double* out, double* gx,
                                                 double* gw, double* gb, const Shape& s, int64_t c, const double* w,
                                                 const double* rm, const double* rv, double eps) {
  backward_channel(grad, x, out, gx, gw, gb, s, c, w, rm, rv, eps);
}
inline void backward_channel_any(const float* grad, const float* x, const float* out, float* gx, double* gw,
                                 double* gb, const Shape& s, int64_t c, const float* w, const float* rm,
                                 const float* rv, double eps) {
  backward_channel_float(grad, x, out, gx, gw, gb, s, c, w, rm, rv, eps);
}
inline void backward_channel_any(const double* grad, const double* x, const double* out, double* gx, double* gw,
                                 double* gb, const Shape& s, int64_t c, const double* w, const double* rm,
                                 const double* rv, double eps) {
  backward_channel_double(grad, x, out, gx, gw, gb, s, c, w, rm, rv, eps);
}

PYMETA_MULTIVERSION void double_backward_channel_float(const float* ggx, const float* ggw, const float* ggb,
                                                       const float* grad, const float* x, const float* out,
                                                       float* dgrad, float* dx, double* dw, const Shape& s, int64_t c,
                                                       const float* w, const float* rm, const float* rv, double eps) {
  double_backward_channel(ggx, ggw, ggb, grad, x, out, dgrad, dx, dw, s, c, w, rm, rv, eps);
}
PYMETA_MULTIVERSION void double_backward_channel_double(const double* ggx, const double* ggw, const double* ggb,
                                                        const double* grad, const double* x, const double* out,
                                                        double* dgrad, double* dx, double* dw, const Shape& s,
                                                        int64_t c, const double* w, const double* rm,
                                                        const double* rv, double eps) {
  double_backward_channel(ggx, ggw, ggb, grad, x, out, dgrad, dx, dw, s, c, w, rm, rv, eps);
}
inline void double_backward_channel_any(const float* ggx, const float* ggw, const float* ggb, const float* grad,
                                        const float* x, const float* out, float* dgrad, float* dx, double* dw,
                                        const Shape& s, int64_t c, const float* w, const float* rm, const float* rv,
                                        double eps) {
  double_backward_channel_float(ggx, ggw, ggb, grad, x, out, dgrad, dx, dw, s, c, w, rm, rv, eps);
}
inline void double_backward_channel_any(const double* ggx, const double* ggw, const double* ggb, const double* grad,
                                        const double* x, const double* out, double* dgrad, double* dx, double* dw,
                                        const Shape& s, int64_t c, const double* w, const double* rm,
                                        const double* rv, double eps) {
  double_backward_channel_double(ggx, ggw, ggb, grad, x, out, dgrad, dx, dw, s, c, w, rm, rv, eps);
}

// Two per-channel tensors ([C], x's dtype), named together by `what` in the error.
void check_per_channel(const char* what, const at::Tensor& first, const at::Tensor& second, const at::Tensor& x) {
  const int64_t C = x.size(1);
  for (const at::Tensor* p : {&first, &second}) {
    TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == C && p->scalar_type() == x.scalar_type(), what,
                      " must be [C] = [", C, "] of x's dtype, got shape ", p->sizes());
  }
}

Shape check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(2) >= 2 && x.size(3) >= 2,
                    "x must be [B, C, H, W] with H, W >= 2, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), "the cpp backend runs on CPU tensors, got ", x.device());
  const int64_t C = x.size(1);
  check_per_channel("weight and bias", weight, bias, x);
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together or both be None");
  if (running_mean.has_value()) check_per_channel("running statistics", *running_mean, *running_var, x);
  return {x.size(0), C, x.size(2), x.size(3), x.size(2) / 2, x.size(3) / 2};
}

void check_pooled(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& x, const Shape& s) {
  for (const at::Tensor* t : {&grad, &out}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({s.B, s.C, s.OH, s.OW}) && t->scalar_type() == x.scalar_type(),
                      "grad and out must be [B, C, H/2, W/2] = [", s.B, ", ", s.C, ", ", s.OH, ", ", s.OW,
                      "] of x's dtype, got shape ", t->sizes());
  }
}

template <typename T>
const T* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

at::Tensor batch_norm_relu_pool_cpu(const at::Tensor& input, const at::Tensor& weight_in, const at::Tensor& bias_in,
                                    const std::optional<at::Tensor>& rm_in, const std::optional<at::Tensor>& rv_in,
                                    double eps) {
  const Shape s = check_inputs(input, weight_in, bias_in, rm_in, rv_in);
  const at::Tensor x = input.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const std::optional<at::Tensor> rm = rm_in ? std::optional(rm_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> rv = rv_in ? std::optional(rv_in->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({s.B, s.C, s.OH, s.OW}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_batch_norm_relu_pool", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const scalar_t *w = weight.const_data_ptr<scalar_t>(), *b = bias.const_data_ptr<scalar_t>();
    const scalar_t *m = optional_data<scalar_t>(rm), *v = optional_data<scalar_t>(rv);
    at::parallel_for(0, s.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) forward_channel_any(xp, op, s, c, w, b, m, v, eps);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_pool_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& input, const at::Tensor& out_in, const at::Tensor& weight_in,
    const at::Tensor& bias_in, const std::optional<at::Tensor>& rm_in, const std::optional<at::Tensor>& rv_in,
    double eps) {
  const Shape s = check_inputs(input, weight_in, bias_in, rm_in, rv_in);
  check_pooled(grad_in, out_in, input, s);
  const at::Tensor x = input.contiguous(), grad = grad_in.contiguous(), out = out_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const std::optional<at::Tensor> rm = rm_in ? std::optional(rm_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> rv = rv_in ? std::optional(rv_in->contiguous()) : std::nullopt;
  at::Tensor gx = at::empty_like(x);
  at::Tensor gw_sum = at::empty({s.C}, x.options().dtype(at::kDouble));
  at::Tensor gb_sum = at::empty({s.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_batch_norm_relu_pool_backward", [&] {
    const scalar_t *g = grad.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    const scalar_t *o = out.const_data_ptr<scalar_t>(), *w = weight.const_data_ptr<scalar_t>();
    const scalar_t *m = optional_data<scalar_t>(rm), *v = optional_data<scalar_t>(rv);
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    double *gw = gw_sum.mutable_data_ptr<double>(), *gb = gb_sum.mutable_data_ptr<double>();
    at::parallel_for(0, s.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) backward_channel_any(g, xp, o, gxp, gw + c, gb + c, s, c, w, m, v, eps);
    });
  });
  return {gx, gw_sum.to(input.scalar_type()), gb_sum.to(input.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_pool_backward_backward_cpu(
    const at::Tensor& gg_x_in, const at::Tensor& gg_weight_in, const at::Tensor& gg_bias_in, const at::Tensor& grad_in,
    const at::Tensor& input, const at::Tensor& out_in, const at::Tensor& weight_in, const at::Tensor& bias_in,
    const std::optional<at::Tensor>& rm_in, const std::optional<at::Tensor>& rv_in, double eps) {
  const Shape s = check_inputs(input, weight_in, bias_in, rm_in, rv_in);
  check_pooled(grad_in, out_in, input, s);
  TORCH_CHECK_VALUE(gg_x_in.sizes() == input.sizes() && gg_x_in.scalar_type() == input.scalar_type(),
                    "gg_x must have x's shape ", input.sizes(), " and dtype, got shape ", gg_x_in.sizes());
  check_per_channel("gg_weight and gg_bias", gg_weight_in, gg_bias_in, input);
  const at::Tensor x = input.contiguous(), grad = grad_in.contiguous(), out = out_in.contiguous();
  const at::Tensor gg_x = gg_x_in.contiguous(), gg_w = gg_weight_in.contiguous(), gg_b = gg_bias_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const std::optional<at::Tensor> rm = rm_in ? std::optional(rm_in->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> rv = rv_in ? std::optional(rv_in->contiguous()) : std::nullopt;
  at::Tensor d_grad = at::empty_like(grad), d_x = at::empty_like(x);
  at::Tensor d_weight = at::empty({s.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_batch_norm_relu_pool_backward_backward", [&] {
    const scalar_t *a = gg_x.const_data_ptr<scalar_t>(), *aw = gg_w.const_data_ptr<scalar_t>();
    const scalar_t *ab = gg_b.const_data_ptr<scalar_t>(), *g = grad.const_data_ptr<scalar_t>();
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *o = out.const_data_ptr<scalar_t>();
    const scalar_t *w = weight.const_data_ptr<scalar_t>();
    const scalar_t *m = optional_data<scalar_t>(rm), *v = optional_data<scalar_t>(rv);
    scalar_t *dg = d_grad.mutable_data_ptr<scalar_t>(), *dx = d_x.mutable_data_ptr<scalar_t>();
    double* dw = d_weight.mutable_data_ptr<double>();
    at::parallel_for(0, s.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double_backward_channel_any(a, aw, ab, g, xp, o, dg, dx, dw + c, s, c, w, m, v, eps);
      }
    });
  });
  return {d_grad, d_x, d_weight.to(input.scalar_type())};
}

}  // namespace
}  // namespace pymeta

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def(
      "batch_norm_relu_pool(Tensor x, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, "
      "float eps) -> Tensor");
  m.def(
      "batch_norm_relu_pool_backward(Tensor grad, Tensor x, Tensor out, Tensor weight, Tensor bias, "
      "Tensor? running_mean, Tensor? running_var, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_relu_pool_backward_backward(Tensor gg_x, Tensor gg_weight, Tensor gg_bias, Tensor grad, Tensor x, "
      "Tensor out, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, float eps) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("batch_norm_relu_pool", &pymeta::batch_norm_relu_pool_cpu);
  m.impl("batch_norm_relu_pool_backward", &pymeta::batch_norm_relu_pool_backward_cpu);
  m.impl("batch_norm_relu_pool_backward_backward", &pymeta::batch_norm_relu_pool_backward_backward_cpu);
}
