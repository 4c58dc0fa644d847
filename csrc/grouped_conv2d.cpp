// The weight gradient of a stride-1 convolution with few input channels per group: what
// pymeta.ops.grouped_conv2d's weight gradient runs on CPU when each output channel reads
// at most a few input planes (an image model's first layer: 1 grey or 3 colour channels).
// oneDNN's backward-weights kernel is slow on that shape: conv4's first layer on
// [75, 1, 28, 28] Omniglot images (64 output channels, 3x3 kernel, 1 thread) took 11-22 ms
// for 68 MFLOP, more than its 64-channel second layer's input gradient at 16x the work.
//
// Per image b it is a matrix product, gw[o, t] += sum over p of grad[b, o, p] * cols[t, p]:
// t runs over the Ci * kh * kw taps, p over the Ho * Wo output positions, and cols is the
// image's im2col (cols[(c, ky, kx), (y, x)] = x[b, g*Ci + c, y + ky - ph, x + kx - pw], 0
// outside; per group g). A GEMM library handles that poorly with so few taps (bmm
// of [75, 64, 784] by [75, 784, 9]: 13.7 ms); here a block of up to 9 taps keeps its
// accumulators in vector registers while one pass reads a grad plane: one load of grad
// and one of cols per multiply-add of a tap (GCC vector extensions, 32 bytes: two SSE2
// vectors in the portable clone, one AVX2 vector in the x86-64-v3 one). Each image adds
// its dot products to a per-thread float64 total, so a float32 sum runs over one plane.
//
// Layout: grad [B, G*Co, Ho, Wo], x [B, G*Ci, H, W] (NCHW, made contiguous), weight (its
// shape only) [G*Co, Ci, kh, kw] -> [G*Co, Ci, kh, kw]; Ho = H + 2*ph - kh + 1, alike Wo.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "multiversion.h"

namespace pymeta {
namespace {

struct Shape {
  int64_t B, G, Ci, Co, H, W, Ho, Wo, ph, pw, kh, kw;
  int64_t taps() const { return Ci * kh * kw; }
};

constexpr int64_t BYTES = 32;  // one vector of the kernels below
constexpr int TAP_BLOCK = 9;   // accumulators held in registers (9 + grad + a product: 11 of 16)

// cols [taps, Ho * Wo] of image b, group g: the im2col above.
template <typename scalar_t>
PYMETA_INLINE void im2col(const scalar_t* x, const Shape& s, int64_t b, int64_t g, scalar_t* cols) {
  const int64_t HoWo = s.Ho * s.Wo;
  for (int64_t c = 0; c < s.Ci; ++c) {
    const scalar_t* plane = x + ((b * s.G + g) * s.Ci + c) * s.H * s.W;
    for (int64_t ky = 0; ky < s.kh; ++ky) {
      for (int64_t kx = 0; kx < s.kw; ++kx) {
        scalar_t* col = cols + ((c * s.kh + ky) * s.kw + kx) * HoWo;
        for (int64_t y = 0; y < s.Ho; ++y) {
          const int64_t iy = y + ky - s.ph;
          scalar_t* out = col + y * s.Wo;
          if (iy < 0 || iy >= s.H) {
            std::fill(out, out + s.Wo, scalar_t(0));
            continue;
          }
          // Columns x whose input column x + kx - pw lies in [0, W).
          const int64_t x0 = std::clamp<int64_t>(s.pw - kx, 0, s.Wo), x1 = std::clamp<int64_t>(s.W + s.pw - kx, x0, s.Wo);
          std::fill(out, out + x0, scalar_t(0));
          std::copy(plane + iy * s.W + x0 + kx - s.pw, plane + iy * s.W + x1 + kx - s.pw, out + x0);
          std::fill(out + x1, out + s.Wo, scalar_t(0));
        }
      }
    }
  }
}

// total[t] += sum over p < n of grad[p] * cols[t][p] for NT taps (cols rows n apart).
template <int NT, typename scalar_t>
PYMETA_INLINE void dot_taps(const scalar_t* grad, const scalar_t* cols, int64_t n, double* total) {
  typedef scalar_t vec __attribute__((vector_size(BYTES)));
  constexpr int64_t L = BYTES / sizeof(scalar_t);
  vec acc[NT] = {};
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    vec g;
    std::memcpy(&g, grad + p, BYTES);
    for (int t = 0; t < NT; ++t) {
      vec c;
      std::memcpy(&c, cols + t * n + p, BYTES);
      acc[t] += g * c;
    }
  }
  for (int t = 0; t < NT; ++t) {
    scalar_t sum = 0;
    for (int64_t l = 0; l < L; ++l) sum += acc[t][l];
    for (int64_t q = p; q < n; ++q) sum += grad[q] * cols[t * n + q];
    total[t] += sum;
  }
}

template <typename scalar_t>
PYMETA_INLINE void dot_tap_block(int nt, const scalar_t* grad, const scalar_t* cols, int64_t n, double* total) {
  switch (nt) {
    case 1: return dot_taps<1>(grad, cols, n, total);
    case 2: return dot_taps<2>(grad, cols, n, total);
    case 3: return dot_taps<3>(grad, cols, n, total);
    case 4: return dot_taps<4>(grad, cols, n, total);
    case 5: return dot_taps<5>(grad, cols, n, total);
    case 6: return dot_taps<6>(grad, cols, n, total);
    case 7: return dot_taps<7>(grad, cols, n, total);
    case 8: return dot_taps<8>(grad, cols, n, total);
    default: return dot_taps<TAP_BLOCK>(grad, cols, n, total);
  }
}

// Adds images [begin, end) to total [G*Co, taps]; cols: this thread's [taps, Ho * Wo].
template <typename scalar_t>
PYMETA_INLINE void weight_grad_images(const scalar_t* grad, const scalar_t* x, const Shape& s, int64_t begin,
                                      int64_t end, scalar_t* cols, double* total) {
  const int64_t taps = s.taps(), HoWo = s.Ho * s.Wo;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t g = 0; g < s.G; ++g) {
      im2col(x, s, b, g, cols);
      for (int64_t o = g * s.Co; o < (g + 1) * s.Co; ++o) {
        const scalar_t* plane = grad + (b * s.G * s.Co + o) * HoWo;
        for (int64_t t = 0; t < taps; t += TAP_BLOCK) {
          const int nt = static_cast<int>(std::min<int64_t>(TAP_BLOCK, taps - t));
          dot_tap_block(nt, plane, cols + t * HoWo, HoWo, total + o * taps + t);
        }
      }
    }
  }
}

// out[p] (+)= sum over NT taps of w[t] * cols[t][p] for p < n (cols rows n apart), from
// bias when `first`, else onto what out holds (taps beyond the first block).
template <int NT, typename scalar_t>
PYMETA_INLINE void combine_taps(const scalar_t* w, const scalar_t* cols, int64_t n, bool first, scalar_t bias,
                                scalar_t* out) {
  typedef scalar_t vec __attribute__((vector_size(BYTES)));
  constexpr int64_t L = BYTES / sizeof(scalar_t);
  vec wv[NT];
  for (int t = 0; t < NT; ++t) wv[t] = vec{} + w[t];
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    vec acc = vec{} + bias;
    if (!first) std::memcpy(&acc, out + p, BYTES);
    for (int t = 0; t < NT; ++t) {
      vec c;
      std::memcpy(&c, cols + t * n + p, BYTES);
      acc += wv[t] * c;
    }
    std::memcpy(out + p, &acc, BYTES);
  }
  for (; p < n; ++p) {
    scalar_t acc = first ? bias : out[p];
    for (int t = 0; t < NT; ++t) acc += w[t] * cols[t * n + p];
    out[p] = acc;
  }
}

template <typename scalar_t>
PYMETA_INLINE void combine_tap_block(int nt, const scalar_t* w, const scalar_t* cols, int64_t n, bool first,
                                     scalar_t bias, scalar_t* out) {
  switch (nt) {
    case 1: return combine_taps<1>(w, cols, n, first, bias, out);
    case 2: return combine_taps<2>(w, cols, n, first, bias, out);
    case 3: return combine_taps<3>(w, cols, n, first, bias, out);
    case 4: return combine_taps<4>(w, cols, n, first, bias, out);
    case 5: return combine_taps<5>(w, cols, n, first, bias, out);
    case 6: return combine_taps<6>(w, cols, n, first, bias, out);
    case 7: return combine_taps<7>(w, cols, n, first, bias, out);
    case 8: return combine_taps<8>(w, cols, n, first, bias, out);
    default: return combine_taps<TAP_BLOCK>(w, cols, n, first, bias, out);
  }
}

// out [B, G*Co, Ho, Wo] of images [begin, end); weight [G*Co, taps], bias [G*Co] or null.
template <typename scalar_t>
PYMETA_INLINE void forward_images(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, const Shape& s,
                                  int64_t begin, int64_t end, scalar_t* cols, scalar_t* out) {
  const int64_t taps = s.taps(), HoWo = s.Ho * s.Wo;
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t g = 0; g < s.G; ++g) {
      im2col(x, s, b, g, cols);
      for (int64_t o = g * s.Co; o < (g + 1) * s.Co; ++o) {
        scalar_t* plane = out + (b * s.G * s.Co + o) * HoWo;
        const scalar_t b_o = bias == nullptr ? scalar_t(0) : bias[o];
        for (int64_t t = 0; t < taps; t += TAP_BLOCK) {
          const int nt = static_cast<int>(std::min<int64_t>(TAP_BLOCK, taps - t));
          combine_tap_block(nt, weight + o * taps + t, cols + t * HoWo, HoWo, t == 0, b_o, plane);
        }
      }
    }
  }
}

PYMETA_MULTIVERSION void forward_float(const float* x, const float* weight, const float* bias, const Shape& s,
                                       int64_t begin, int64_t end, float* cols, float* out) {
  forward_images(x, weight, bias, s, begin, end, cols, out);
}

PYMETA_MULTIVERSION void forward_double(const double* x, const double* weight, const double* bias, const Shape& s,
                                        int64_t begin, int64_t end, double* cols, double* out) {
  forward_images(x, weight, bias, s, begin, end, cols, out);
}

inline void forward_any(const float* x, const float* weight, const float* bias, const Shape& s, int64_t begin,
                        int64_t end, float* cols, float* out) {
  forward_float(x, weight, bias, s, begin, end, cols, out);
}

inline void forward_any(const double* x, const double* weight, const double* bias, const Shape& s, int64_t begin,
                        int64_t end, double* cols, double* out) {
  forward_double(x, weight, bias, s, begin, end, cols, out);
}

// Multiversioned entry points (target_clones wants plain functions, not templates).
PYMETA_MULTIVERSION void weight_grad_float(const float* grad, const float* x, const Shape& s, int64_t begin,
                                           int64_t end, float* cols, double* total) {
  weight_grad_images(grad, x, s, begin, end, cols, total);
}

PYMETA_MULTIVERSION void weight_grad_double(const double* grad, const double* x, const Shape& s, int64_t begin,
                                            int64_t end, double* cols, double* total) {
  weight_grad_images(grad, x, s, begin, end, cols, total);
}

inline void weight_grad_any(const float* grad, const float* x, const Shape& s, int64_t begin, int64_t end,
                            float* cols, double* total) {
  weight_grad_float(grad, x, s, begin, end, cols, total);
}

inline void weight_grad_any(const double* grad, const double* x, const Shape& s, int64_t begin, int64_t end,
                            double* cols, double* total) {
  weight_grad_double(grad, x, s, begin, end, cols, total);
}

// The Shape of a convolution of x [B, G*Ci, H, W] by weight [G*Co, Ci, kh, kw], after
// checking what the kernels assume (the op's Python side passes over them otherwise).
Shape checked_shape(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4, "x and weight must be 4-d, got shapes ", x.sizes(), " and ",
                    weight.sizes());
  TORCH_CHECK_VALUE(stride == at::IntArrayRef({1, 1}) && dilation == at::IntArrayRef({1, 1}),
                    "the cpp kernels compute stride-1, dilation-1 convolutions, got stride ", stride, " and dilation ",
                    dilation);
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "padding must be 2 values >= 0, got ",
                    padding);
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(), "x and weight must have one dtype, got ", x.scalar_type(),
                   " and ", weight.scalar_type());
  const int64_t GCo = weight.size(0), Ci = weight.size(1);
  TORCH_CHECK_VALUE(groups >= 1 && GCo % groups == 0 && x.size(1) == groups * Ci,
                    "x must be [B, groups * Ci, H, W] with weight [G*Co, Ci, kh, kw] = ", weight.sizes(),
                    " and groups = ", groups, ", got x ", x.sizes());
  const Shape s{x.size(0), groups, Ci, GCo / groups, x.size(2), x.size(3), x.size(2) + 2 * padding[0] - weight.size(2) + 1,
                x.size(3) + 2 * padding[1] - weight.size(3) + 1, padding[0], padding[1], weight.size(2), weight.size(3)};
  TORCH_CHECK_VALUE(s.Ho >= 1 && s.Wo >= 1, "kernel ", weight.sizes().slice(2), " is larger than x ", x.sizes(),
                    " padded by ", padding);
  return s;
}

at::Tensor grouped_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                              const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Shape s = checked_shape(x_in, weight_in, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(!bias_in || (bias_in->dim() == 1 && bias_in->size(0) == s.G * s.Co),
                    "bias must be [G*Co] = [", s.G * s.Co, "], got ", bias_in->sizes());
  TORCH_CHECK_TYPE(!bias_in || bias_in->scalar_type() == x_in.scalar_type(), "bias must be ", x_in.scalar_type(),
                   ", got ", bias_in->scalar_type());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional(bias_in->contiguous()) : std::nullopt;
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

at::Tensor grouped_conv2d_weight_grad_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight,
                                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t groups) {
  const Shape s = checked_shape(x_in, weight, stride, padding, dilation, groups);
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({s.B, s.G * s.Co, s.Ho, s.Wo}),
                    "grad must be [B, G*Co, H + 2*ph - kh + 1, W + 2*pw - kw + 1] = [", s.B, ", ", s.G * s.Co, ", ",
                    s.Ho, ", ", s.Wo, "], got ", grad_in.sizes());
  TORCH_CHECK_TYPE(grad_in.scalar_type() == x_in.scalar_type(), "grad and x must have one dtype, got ",
                   grad_in.scalar_type(), " and ", x_in.scalar_type());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
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

}  // namespace
}  // namespace pymeta

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("grouped_conv2d(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> Tensor");
  m.def("grouped_conv2d_weight_grad(Tensor grad, Tensor x, Tensor weight, int[] stride, int[] padding, "
        "int[] dilation, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("grouped_conv2d", &pymeta::grouped_conv2d_cpu);
  m.impl("grouped_conv2d_weight_grad", &pymeta::grouped_conv2d_weight_grad_cpu);
}
