// Stride-1 convolutions with few input channels as im2col and register-blocked tap
// loops: what grouped_conv2d.cpp's kernels and conv2d_batch_norm_relu_pool.cpp's
// first-layer block are built from (grouped_conv2d.cpp's header comment has the why).

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "multiversion.h"

namespace pymeta {
namespace {

struct ConvShape {
  int64_t B, G, Ci, Co, H, W, Ho, Wo, ph, pw, kh, kw;
  int64_t taps() const { return Ci * kh * kw; }
};

constexpr int64_t BYTES = 32;  // one vector of the kernels below
constexpr int TAP_BLOCK = 9;   // accumulators held in registers (9 + grad + a product: 11 of 16)

// Vectors of L consecutive scalars (GCC vector extensions, 32 bytes: two SSE2 vectors in
// the portable clone, one AVX2 vector in the x86-64-v3 one), loaded and stored unaligned.
template <typename T>
struct Lanes {
  typedef T vec __attribute__((vector_size(BYTES)));
  static constexpr int64_t L = BYTES / sizeof(T);
  static PYMETA_INLINE vec load(const T* p) {
    vec v;
    std::memcpy(&v, p, BYTES);
    return v;
  }
  static PYMETA_INLINE void store(T* p, vec v) { std::memcpy(p, &v, BYTES); }
};

// cols [taps, Ho * Wo] of image b, group g: the im2col above.
template <typename scalar_t>
PYMETA_INLINE void im2col(const scalar_t* x, const ConvShape& s, int64_t b, int64_t g, scalar_t* cols) {
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
  using V = Lanes<scalar_t>;
  constexpr int64_t L = V::L;
  typename V::vec acc[NT] = {};
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    const typename V::vec g = V::load(grad + p);
    for (int t = 0; t < NT; ++t) acc[t] += g * V::load(cols + t * n + p);
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

// out[p] (+)= sum over NT taps of w[t] * cols[t][p] for p < n (cols rows n apart), from
// bias when `first`, else onto what out holds (taps beyond the first block).
template <int NT, typename scalar_t>
PYMETA_INLINE void combine_taps(const scalar_t* w, const scalar_t* cols, int64_t n, bool first, scalar_t bias,
                                scalar_t* out) {
  using V = Lanes<scalar_t>;
  typedef typename V::vec vec;
  constexpr int64_t L = V::L;
  vec wv[NT];
  for (int t = 0; t < NT; ++t) wv[t] = vec{} + w[t];
  int64_t p = 0;
  for (; p + L <= n; p += L) {
    vec acc = first ? vec{} + bias : V::load(out + p);
    for (int t = 0; t < NT; ++t) acc += wv[t] * V::load(cols + t * n + p);
    V::store(out + p, acc);
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

// total[t] += sum over p < n of grad[p] * cols[t][p] for all `taps`, TAP_BLOCK at a time.
template <typename scalar_t>
PYMETA_INLINE void dot_all_taps(const scalar_t* grad, const scalar_t* cols, int64_t n, int64_t taps, double* total) {
  for (int64_t t = 0; t < taps; t += TAP_BLOCK) {
    const int nt = static_cast<int>(std::min<int64_t>(TAP_BLOCK, taps - t));
    dot_tap_block(nt, grad, cols + t * n, n, total + t);
  }
}

// out[p] = bias + sum over all `taps` of w[t] * cols[t][p], TAP_BLOCK at a time.
template <typename scalar_t>
PYMETA_INLINE void combine_all_taps(const scalar_t* w, const scalar_t* cols, int64_t n, int64_t taps, scalar_t bias,
                                    scalar_t* out) {
  for (int64_t t = 0; t < taps; t += TAP_BLOCK) {
    const int nt = static_cast<int>(std::min<int64_t>(TAP_BLOCK, taps - t));
    combine_tap_block(nt, w + t, cols + t * n, n, t == 0, bias, out);
  }
}

// The ConvShape of a convolution of x [B, G*Ci, H, W] by weight [G*Co, Ci, kh, kw], after
// checking what the kernels assume (the op's Python side passes over them otherwise).
ConvShape checked_shape(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
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
  const ConvShape s{x.size(0), groups, Ci, GCo / groups, x.size(2), x.size(3), x.size(2) + 2 * padding[0] - weight.size(2) + 1,
                x.size(3) + 2 * padding[1] - weight.size(3) + 1, padding[0], padding[1], weight.size(2), weight.size(3)};
  TORCH_CHECK_VALUE(s.Ho >= 1 && s.Wo >= 1, "kernel ", weight.sizes().slice(2), " is larger than x ", x.sizes(),
                    " padded by ", padding);
  return s;
}

}  // namespace
}  // namespace pymeta
