// pymeta.ops.grouped_conv2d's CPU kernels for stride-1 convolutions: the forward, the
// input gradient and the weight gradient. Layers with more input channels per group than
// MAX_TAP_INPUT_CHANNELS run Winograd's F(2x2, 3x3) when their filters are 3x3, padding <= 2
// (conv_winograd.h); the rest, an image model's first layer above all (1 grey or 3 colour
// channels), run loops over the taps, below. oneDNN's backward-weights kernel is slow on
// such a layer: conv4's first layer on [75, 1, 28, 28] Omniglot images (64 output
// channels, 3x3 kernel, 1 thread) took 11-22 ms for 68 MFLOP, more than its 64-channel
// second layer's input gradient at 16x the work.
//
// The weight gradient per image b is a matrix product, gw[o, t] += sum over p of
// grad[b, o, p] * cols[t, p]: t runs over the Ci * kh * kw taps, p over the Ho * Wo output
// positions, and cols is the image's im2col (cols[(c, ky, kx), (y, x)] = x[b, g*Ci + c,
// y + ky - ph, x + kx - pw], 0 outside; per group g). A GEMM library handles that poorly
// with so few taps (bmm of [75, 64, 784] by [75, 784, 9]: 13.7 ms); here a block of up to
// 9 taps keeps its accumulators in vector registers while one pass reads a grad plane:
// one load of grad and one of cols per multiply-add of a tap (Lanes in conv_taps.h). Each
// image adds its dot products to a per-thread float64 total, so a float32 sum runs over
// one plane. The input gradient is the forward of the gradient with the flipped filters.
//
// Layout: grad [B, G*Co, Ho, Wo], x [B, G*Ci, H, W] (NCHW, made contiguous), weight
// [G*Co, Ci, kh, kw]; Ho = H + 2*ph - kh + 1, alike Wo.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "conv_taps.h"
#include "conv_winograd.h"

namespace pymeta {
namespace {

// Adds images [begin, end) to total [G*Co, taps]; cols: this thread's [taps, Ho * Wo].
template <typename scalar_t>
PYMETA_INLINE void weight_grad_images(const scalar_t* grad, const scalar_t* x, const ConvShape& s, int64_t begin,
                                      int64_t end, scalar_t* cols, double* total) {
  const int64_t taps = s.taps(), HoWo = s.Ho * s.Wo;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t g = 0; g < s.G; ++g) {
      im2col(x, s, b, g, cols);
      for (int64_t o = g * s.Co; o < (g + 1) * s.Co; ++o) {
        dot_all_taps(grad + (b * s.G * s.Co + o) * HoWo, cols, HoWo, taps, total + o * taps);
      }
    }
  }
}

// out [B, G*Co, Ho, Wo] of images [begin, end); weight [G*Co, taps], bias [G*Co] or null.
template <typename scalar_t>
PYMETA_INLINE void forward_images(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, const ConvShape& s,
                                  int64_t begin, int64_t end, scalar_t* cols, scalar_t* out) {
  const int64_t taps = s.taps(), HoWo = s.Ho * s.Wo;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t g = 0; g < s.G; ++g) {
      im2col(x, s, b, g, cols);
      for (int64_t o = g * s.Co; o < (g + 1) * s.Co; ++o) {
        const scalar_t b_o = bias == nullptr ? scalar_t(0) : bias[o];
        combine_all_taps(weight + o * taps, cols, HoWo, taps, b_o, out + (b * s.G * s.Co + o) * HoWo);
      }
    }
  }
}

PYMETA_MULTIVERSION void forward_float(const float* x, const float* weight, const float* bias, const ConvShape& s,
                                       int64_t begin, int64_t end, float* cols, float* out) {
  forward_images(x, weight, bias, s, begin, end, cols, out);
}

PYMETA_MULTIVERSION void forward_double(const double* x, const double* weight, const double* bias, const ConvShape& s,
                                        int64_t begin, int64_t end, double* cols, double* out) {
  forward_images(x, weight, bias, s, begin, end, cols, out);
}

inline void forward_any(const float* x, const float* weight, const float* bias, const ConvShape& s, int64_t begin,
                        int64_t end, float* cols, float* out) {
  forward_float(x, weight, bias, s, begin, end, cols, out);
}

inline void forward_any(const double* x, const double* weight, const double* bias, const ConvShape& s, int64_t begin,
                        int64_t end, double* cols, double* out) {
  forward_double(x, weight, bias, s, begin, end, cols, out);
}

// Multiversioned entry points (target_clones wants plain functions, not templates).
PYMETA_MULTIVERSION void weight_grad_float(const float* grad, const float* x, const ConvShape& s, int64_t begin,
                                           int64_t end, float* cols, double* total) {
  weight_grad_images(grad, x, s, begin, end, cols, total);
}

PYMETA_MULTIVERSION void weight_grad_double(const double* grad, const double* x, const ConvShape& s, int64_t begin,
                                            int64_t end, double* cols, double* total) {
  weight_grad_images(grad, x, s, begin, end, cols, total);
}

inline void weight_grad_any(const float* grad, const float* x, const ConvShape& s, int64_t begin, int64_t end,
                            float* cols, double* total) {
  weight_grad_float(grad, x, s, begin, end, cols, total);
}

inline void weight_grad_any(const double* grad, const double* x, const ConvShape& s, int64_t begin, int64_t end,
                            double* cols, double* total) {
  weight_grad_double(grad, x, s, begin, end, cols, total);
}

// Layers with more input channels per group run F(2x2, 3x3) Winograd (conv_winograd.h)
// when they are 3x3: the tap loops above are for a first layer's 1 to 3 channels.
constexpr int64_t MAX_TAP_INPUT_CHANNELS = 3;

bool uses_winograd(const ConvShape& s) {
  return s.Ci > MAX_TAP_INPUT_CHANNELS && s.kh == 3 && s.kw == 3 && s.ph <= 2 && s.pw <= 2;
}

// x [B, G*Ci, H, W], weight [G*Co, Ci, kh, kw] (both contiguous), bias [G*Co] or none.
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const ConvShape& s) {
  if (uses_winograd(s)) return winograd_forward(x, weight, bias, s);
  at::Tensor out = at::empty({s.B, s.G * s.Co, s.Ho, s.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_grouped_conv2d", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const scalar_t* b = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> cols(s.taps() * s.Ho * s.Wo);
      forward_any(in, w, b, s, begin, end, cols.data(), o);
    });
  });
  return out;
}

at::Tensor grouped_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                              const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvShape s = checked_shape(x_in, weight_in, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(!bias_in || (bias_in->dim() == 1 && bias_in->size(0) == s.G * s.Co),
                    "bias must be [G*Co] = [", s.G * s.Co, "], got ", bias_in->sizes());
  TORCH_CHECK_TYPE(!bias_in || bias_in->scalar_type() == x_in.scalar_type(), "bias must be ", x_in.scalar_type(),
                   ", got ", bias_in->scalar_type());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional(bias_in->contiguous()) : std::nullopt;
  return forward(x, weight, bias, s);
}

// grad must be the output's gradient [B, G*Co, Ho, Wo], of x's dtype.
void check_grad(const at::Tensor& grad, const at::Tensor& x, const ConvShape& s) {
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({s.B, s.G * s.Co, s.Ho, s.Wo}),
                    "grad must be [B, G*Co, H + 2*ph - kh + 1, W + 2*pw - kw + 1] = [", s.B, ", ", s.G * s.Co, ", ",
                    s.Ho, ", ", s.Wo, "], got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "grad and x must have one dtype, got ", grad.scalar_type(),
                   " and ", x.scalar_type());
}

at::Tensor grouped_conv2d_weight_grad_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t groups) {
  const ConvShape s = checked_shape(x_in, weight, stride, padding, dilation, groups);
  check_grad(grad_in, x_in, s);
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  if (uses_winograd(s)) return winograd_weight_grad(grad, x, s);
  const int64_t size = s.G * s.Co * s.taps();
  // One float64 total per thread (at most a few: images are split in as many ranges).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(s.B, at::get_num_threads()));
  std::vector<double> totals(chunks * size, 0.0);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "pymeta_grouped_conv2d_weight_grad", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      std::vector<scalar_t> cols(s.taps() * s.Ho * s.Wo);
      for (int64_t k = first; k < last; ++k) {
        weight_grad_any(g, in, s, k * s.B / chunks, (k + 1) * s.B / chunks, cols.data(), totals.data() + k * size);
      }
    });
  });
  for (int64_t k = 1; k < chunks; ++k) {
    for (int64_t i = 0; i < size; ++i) totals[i] += totals[k * size + i];
  }
  at::Tensor gw = at::empty(weight.sizes(), grad.options().dtype(at::kDouble));
  std::copy(totals.begin(), totals.begin() + size, gw.mutable_data_ptr<double>());
  return gw.to(grad.scalar_type());
}

// The input gradient of a stride-1 convolution: the forward convolution of grad with the
// filters flipped and their input and output channels swapped, padding k - 1 - p (which
// must be >= 0): Winograd's for 3x3 filters, else the tap loops.
at::Tensor grouped_conv2d_input_grad_cpu(const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& weight,
                                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups) {
  const ConvShape s = checked_shape(x, weight, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(s.ph < s.kh && s.pw < s.kw, "the cpp input gradient takes padding below the kernel size, got kernel ",
                    weight.sizes().slice(2), " and padding ", padding);
  check_grad(grad_in, x, s);
  const at::Tensor flipped = weight.view({s.G, s.Co, s.Ci, s.kh, s.kw})
                                 .transpose(1, 2)
                                 .flip({3, 4})
                                 .reshape({s.G * s.Ci, s.Co, s.kh, s.kw})
                                 .contiguous();
  const ConvShape t{s.B, s.G, s.Co, s.Ci, s.Ho, s.Wo, s.H, s.W, s.kh - 1 - s.ph, s.kw - 1 - s.pw, s.kh, s.kw};
  return forward(grad_in.contiguous(), flipped, std::nullopt, t);
}

}  // namespace
}  // namespace pymeta

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("grouped_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> Tensor");
  m.def("grouped_conv2d_input_grad(Tensor grad, Tensor x, Tensor weight, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
  m.def("grouped_conv2d_weight_grad(Tensor grad, Tensor x, Tensor weight, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("grouped_conv2d", &pymeta::grouped_conv2d_cpu);
  m.impl("grouped_conv2d_input_grad", &pymeta::grouped_conv2d_input_grad_cpu);
  m.impl("grouped_conv2d_weight_grad", &pymeta::grouped_conv2d_weight_grad_cpu);
}
