// C++ CPU kernels of pymeta::conv2d_batch_norm_relu_pool: an image model's first block,
// a stride-1 convolution of few input channels, BatchNorm, ReLU and 2x2 max-pooling,
// and its first-order backward. Math: pymeta/ops/conv2d_batch_norm_relu_pool.py.
//
// The convolution's output (conv4 on 75 Omniglot images: [75, 64, 28, 28], 15 MB) is the
// largest tensor of a conv4 step, and cheap to compute (9 multiply-adds per value), so it
// is never written: per output channel o, the channel's convolution runs into a buffer
// [B, Ho, Wo] (235 KB, in the L2 cache), batch_norm_relu_pool's channel loops
// (batch_norm_relu_pool.h) normalise and pool it to out[:, o], and the backward computes
// it again, takes the BatchNorm + pooling gradient into a second buffer and reduces that
// to the convolution's weight and bias gradients at once. Separately, the convolution
// wrote 15 MB to memory, BatchNorm + pooling read it twice (forward, backward), and the
// backward wrote and read its 15 MB gradient. Peak memory of a conv4 MAML step drops by
// those 15 MB (40 -> 17 MiB); time about evens out (1 thread, 2-core AMD EPYC: the
// block's kernels 20.8 -> 17.9 ms per task in a profile, whole steps within noise), as
// the BatchNorm + pooling backward's window loops, not memory, are most of the block.
//
// Layout (NCHW, made contiguous): x [B, G*Ci, H, W], conv_weight [G*Co, Ci, kh, kw],
// conv_bias [G*Co] or none, weight, bias, running statistics [G*Co]; out [B, G*Co, Ho/2,
// Wo/2] with Ho = H + 2*ph - kh + 1, alike Wo. The images get no gradient (the op's
// Python side runs the two ops separately when they need one).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "batch_norm_relu_pool.h"
#include "conv_taps.h"

namespace pymeta {
namespace {

// What every channel of one call reads and writes (a channel's parameters at [o]).
template <typename T>
struct Block {
  const T* cols;  // [B, G, taps, Ho * Wo]: every image's im2col per group
  const T *conv_weight, *conv_bias, *weight, *bias, *running_mean, *running_var;  // conv_bias, running_*: may be null
  double eps;
  ConvShape conv;
  Shape pooled;  // one channel: {B, 1, Ho, Wo, Ho / 2, Wo / 2}
};

// buf [B, Ho * Wo] = channel o's convolution (its bias included).
template <typename T>
PYMETA_INLINE void convolve_channel(const Block<T>& k, int64_t o, T* buf) {
  const ConvShape& s = k.conv;
  const int64_t taps = s.taps(), HoWo = s.Ho * s.Wo, g = o / s.Co;
  const T b_o = k.conv_bias == nullptr ? T(0) : k.conv_bias[o];
  for (int64_t b = 0; b < s.B; ++b) {
    combine_all_taps(k.conv_weight + o * taps, k.cols + (b * s.G + g) * taps * HoWo, HoWo, taps, b_o, buf + b * HoWo);
  }
}

// Pointers to channel o's parameters, as batch_norm_relu_pool's loops index them (at [0]).
template <typename T>
PYMETA_INLINE const T* at_channel(const T* p, int64_t o) {
  return p == nullptr ? nullptr : p + o;
}

// out[:, o] for channels [begin, end); buf [B, Ho*Wo] and pooled [B, Ho/2 * Wo/2]: scratch.
template <typename T>
PYMETA_INLINE void forward_channels(const Block<T>& k, T* out, int64_t begin, int64_t end, T* buf, T* pooled) {
  const Shape& p = k.pooled;
  const int64_t C = k.conv.G * k.conv.Co, OHW = p.out_plane();
  for (int64_t o = begin; o < end; ++o) {
    convolve_channel(k, o, buf);
    forward_channel(static_cast<const T*>(buf), pooled, p, 0, k.weight + o, k.bias + o, at_channel(k.running_mean, o),
                    at_channel(k.running_var, o), k.eps);
    for (int64_t b = 0; b < p.B; ++b) std::copy(pooled + b * OHW, pooled + (b + 1) * OHW, out + (b * C + o) * OHW);
  }
}

// Gradients of channels [begin, end): conv_grad [G*Co, taps] and the three per-channel
// ones (float64), from grad and out [B, G*Co, Ho/2, Wo/2]. buf, gbuf: [B, Ho*Wo];
// grad_o, out_o: [B, Ho/2 * Wo/2]; scratch.
template <typename T>
PYMETA_INLINE void backward_channels(const Block<T>& k, const T* grad, const T* out, double* conv_grad,
                                     double* conv_bias_grad, double* weight_grad, double* bias_grad, int64_t begin,
                                     int64_t end, T* buf, T* gbuf, T* grad_o, T* out_o) {
  const Shape& p = k.pooled;
  const ConvShape& s = k.conv;
  const int64_t C = s.G * s.Co, OHW = p.out_plane(), HoWo = s.Ho * s.Wo, taps = s.taps();
  for (int64_t o = begin; o < end; ++o) {
    convolve_channel(k, o, buf);
    for (int64_t b = 0; b < p.B; ++b) {
      std::copy(grad + (b * C + o) * OHW, grad + (b * C + o + 1) * OHW, grad_o + b * OHW);
      std::copy(out + (b * C + o) * OHW, out + (b * C + o + 1) * OHW, out_o + b * OHW);
    }
    backward_channel(static_cast<const T*>(grad_o), static_cast<const T*>(buf), static_cast<const T*>(out_o), gbuf,
                     weight_grad + o, bias_grad + o, p, 0, k.weight + o, at_channel(k.running_mean, o),
                     at_channel(k.running_var, o), k.eps);
    double* total = conv_grad + o * taps;
    for (int64_t t = 0; t < taps; ++t) total[t] = 0;
    double bias_total = 0;
    for (int64_t b = 0; b < s.B; ++b) {
      dot_all_taps(gbuf + b * HoWo, k.cols + (b * s.G + o / s.Co) * taps * HoWo, HoWo, taps, total);
      bias_total += plane_sum(gbuf + b * HoWo, HoWo);
    }
    conv_bias_grad[o] = bias_total;
  }
}

// Multiversioned entry points (multiversion.h).
PYMETA_MULTIVERSION void forward_float(const Block<float>& k, float* out, int64_t begin, int64_t end, float* buf,
                                       float* pooled) {
  forward_channels(k, out, begin, end, buf, pooled);
}

PYMETA_MULTIVERSION void forward_double(const Block<double>& k, double* out, int64_t begin, int64_t end, double* buf,
                                        double* pooled) {
  forward_channels(k, out, begin, end, buf, pooled);
}

inline void forward_any(const Block<float>& k, float* out, int64_t begin, int64_t end, float* buf, float* pooled) {
  forward_float(k, out, begin, end, buf, pooled);
}

inline void forward_any(const Block<double>& k, double* out, int64_t begin, int64_t end, double* buf,
                        double* pooled) {
  forward_double(k, out, begin, end, buf, pooled);
}

PYMETA_MULTIVERSION void backward_float(const Block<float>& k, const float* grad, const float* out, double* cg,
                                        double* cbg, double* wg, double* bg, int64_t begin, int64_t end, float* buf,
                                        float* gbuf, float* grad_o, float* out_o) {
  backward_channels(k, grad, out, cg, cbg, wg, bg, begin, end, buf, gbuf, grad_o, out_o);
}

PYMETA_MULTIVERSION void backward_double(const Block<double>& k, const double* grad, const double* out, double* cg,
                                         double* cbg, double* wg, double* bg, int64_t begin, int64_t end, double* buf,
                                         double* gbuf, double* grad_o, double* out_o) {
  backward_channels(k, grad, out, cg, cbg, wg, bg, begin, end, buf, gbuf, grad_o, out_o);
}

inline void backward_any(const Block<float>& k, const float* grad, const float* out, double* cg, double* cbg,
                         double* wg, double* bg, int64_t begin, int64_t end, float* buf, float* gbuf, float* grad_o,
                         float* out_o) {
  backward_float(k, grad, out, cg, cbg, wg, bg, begin, end, buf, gbuf, grad_o, out_o);
}

inline void backward_any(const Block<double>& k, const double* grad, const double* out, double* cg, double* cbg,
                         double* wg, double* bg, int64_t begin, int64_t end, double* buf, double* gbuf,
                         double* grad_o, double* out_o) {
  backward_double(k, grad, out, cg, cbg, wg, bg, begin, end, buf, gbuf, grad_o, out_o);
}

// The arguments both kernels take, checked and made contiguous, with the im2col of x.
struct Arguments {
  ConvShape conv;
  Shape pooled;
  at::Tensor cols, conv_weight, weight, bias;
  std::optional<at::Tensor> conv_bias, running_mean, running_var;

  template <typename T>
  Block<T> block(double eps) const {
    auto data = [](const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr<T>() : nullptr; };
    return {cols.const_data_ptr<T>(), conv_weight.const_data_ptr<T>(), data(conv_bias), weight.const_data_ptr<T>(),
            bias.const_data_ptr<T>(), data(running_mean), data(running_var), eps, conv, pooled};
  }
};

Arguments checked_arguments(const at::Tensor& x_in, const at::Tensor& conv_weight,
                            const std::optional<at::Tensor>& conv_bias, const at::Tensor& weight,
                            const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, at::IntArrayRef padding, int64_t groups) {
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
                   "x must be float32 or float64, got ", x_in.scalar_type());
  const ConvShape s = checked_shape(x_in, conv_weight, {1, 1}, padding, {1, 1}, groups);
  TORCH_CHECK_VALUE(s.Ho >= 2 && s.Wo >= 2, "the convolution's output must be at least 2x2 for 2x2 pooling, got ",
                    s.Ho, "x", s.Wo);
  const int64_t C = s.G * s.Co;
  for (const at::Tensor* p : {&weight, &bias, conv_bias ? &*conv_bias : nullptr, running_mean ? &*running_mean : nullptr,
                              running_var ? &*running_var : nullptr}) {
    TORCH_CHECK_VALUE(!p || (p->dim() == 1 && p->size(0) == C && p->scalar_type() == x_in.scalar_type()),
                      "weight, bias, conv_bias and the running statistics must be [G*Co] = [", C, "] of x's dtype, got ",
                      p->sizes(), " ", p->scalar_type());
  }
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together or both be None");
  const at::Tensor x = x_in.contiguous();
  at::Tensor cols = at::empty({s.B, s.G, s.taps(), s.Ho * s.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_conv2d_batch_norm_relu_pool_im2col", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* c = cols.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) im2col(in, s, i / s.G, i % s.G, c + i * s.taps() * s.Ho * s.Wo);
    });
  });
  auto contiguous = [](const std::optional<at::Tensor>& t) { return t ? std::optional(t->contiguous()) : std::nullopt; };
  return {s, Shape{s.B, 1, s.Ho, s.Wo, s.Ho / 2, s.Wo / 2}, cols, conv_weight.contiguous(), weight.contiguous(),
          bias.contiguous(), contiguous(conv_bias), contiguous(running_mean), contiguous(running_var)};
}

at::Tensor conv2d_batch_norm_relu_pool_cpu(const at::Tensor& x, const at::Tensor& conv_weight,
                                           const std::optional<at::Tensor>& conv_bias, const at::Tensor& weight,
                                           const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
                                           const std::optional<at::Tensor>& running_var, double eps,
                                           at::IntArrayRef padding, int64_t groups) {
  const Arguments a = checked_arguments(x, conv_weight, conv_bias, weight, bias, running_mean, running_var, padding, groups);
  const int64_t C = a.conv.G * a.conv.Co;
  at::Tensor out = at::empty({a.pooled.B, C, a.pooled.OH, a.pooled.OW}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_conv2d_batch_norm_relu_pool", [&] {
    const Block<scalar_t> k = a.block<scalar_t>(eps);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(a.pooled.B * a.pooled.plane()), pooled(a.pooled.B * a.pooled.out_plane());
      forward_any(k, o, begin, end, buf.data(), pooled.data());
    });
  });
  return out;
}

// (grad conv_weight, grad conv_bias, grad weight, grad bias): grad conv_bias is computed
// whether or not there is a conv_bias (the op's vjp drops it then).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_batch_norm_relu_pool_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& out_in, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double eps,
    at::IntArrayRef padding, int64_t groups) {
  const Arguments a = checked_arguments(x, conv_weight, conv_bias, weight, bias, running_mean, running_var, padding, groups);
  const int64_t C = a.conv.G * a.conv.Co;
  for (const at::Tensor* t : {&grad_in, &out_in}) {
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef({a.pooled.B, C, a.pooled.OH, a.pooled.OW}) &&
                          t->scalar_type() == x.scalar_type(),
                      "grad and out must be [B, G*Co, Ho/2, Wo/2] = [", a.pooled.B, ", ", C, ", ", a.pooled.OH, ", ",
                      a.pooled.OW, "] of x's dtype, got shape ", t->sizes());
  }
  const at::Tensor grad = grad_in.contiguous(), out = out_in.contiguous();
  const auto as_double = x.options().dtype(at::kDouble);
  at::Tensor conv_grad = at::empty(conv_weight.sizes(), as_double), conv_bias_grad = at::empty({C}, as_double);
  at::Tensor weight_grad = at::empty({C}, as_double), bias_grad = at::empty({C}, as_double);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_conv2d_batch_norm_relu_pool_backward", [&] {
    const Block<scalar_t> k = a.block<scalar_t>(eps);
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      const int64_t full = a.pooled.B * a.pooled.plane(), pooled = a.pooled.B * a.pooled.out_plane();
      std::vector<scalar_t> buf(full), gbuf(full), grad_o(pooled), out_o(pooled);
      backward_any(k, grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                   conv_grad.mutable_data_ptr<double>(), conv_bias_grad.mutable_data_ptr<double>(),
                   weight_grad.mutable_data_ptr<double>(), bias_grad.mutable_data_ptr<double>(), begin, end,
                   buf.data(), gbuf.data(), grad_o.data(), out_o.data());
    });
  });
  const auto dtype = x.scalar_type();
  return {conv_grad.to(dtype), conv_bias_grad.to(dtype), weight_grad.to(dtype), bias_grad.to(dtype)};
}

}  // namespace
}  // namespace pymeta

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("conv2d_batch_norm_relu_pool(Tensor x, Tensor conv_weight, Tensor? conv_bias, Tensor weight, Tensor bias, "
        "Tensor? running_mean, Tensor? running_var, float eps, int[] padding, int groups) -> Tensor");
  m.def("conv2d_batch_norm_relu_pool_backward(Tensor grad, Tensor x, Tensor out, Tensor conv_weight, "
        "Tensor? conv_bias, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, float eps, "
        "int[] padding, int groups) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("conv2d_batch_norm_relu_pool", &pymeta::conv2d_batch_norm_relu_pool_cpu);
  m.impl("conv2d_batch_norm_relu_pool_backward", &pymeta::conv2d_batch_norm_relu_pool_backward_cpu);
}
