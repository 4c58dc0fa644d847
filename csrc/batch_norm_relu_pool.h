// The per-channel loops of pymeta::batch_norm_relu_pool (BatchNorm, ReLU and 2x2
// max-pooling of conv4's blocks in one pass) and its backward: batch_norm_relu_pool.cpp
// runs them on a whole tensor, conv2d_batch_norm_relu_pool.cpp on one channel's
// convolution at a time. Math: pymeta/ops/batch_norm_relu_pool.py.
//
// Layout (contiguous NCHW): x [B, C, H, W], out [B, C, H/2, W/2] (floor), weight, bias,
// running statistics [C]. Work is split by channel: one channel of a conv4 batch
// ([75, ., 28, 28]: 75 planes of 784 values, 235 KB in float32) stays in the L2 cache
// while every pass of its statistics, normalisation, pooling and gradient runs over it,
// so the full-resolution tensor is read from memory about once per direction, and the
// normalised full-resolution tensor, the pooling indices and the zero-filled gradient
// buffer ATen's three kernels need never exist.
//
// With scale = weight * invstd, y = (x - mean) * scale + bias is monotonic in x, so each
// window's maximum of y is y at the window's maximum of x (its minimum when scale < 0; its first element when scale is 0 and all of y is equal). The
// window is chosen on x by ATen's rule (a greater, or here smaller, value or a NaN takes
// over), an integer decision that the forward and the backward make identically.
// Backward (train mode, M = B * H * W positions, gz = grad where out > 0):
//   s1 = sum gz, s2 = sum gz * xhat[argmax],
//   grad x = scale * ([x is its window's argmax] gz - s1 / M - xhat * s2 / M),
// (eval mode: scale * [argmax] gz), grad weight = s2, grad bias = s1.
// Sums run in float lanes per plane and in double across planes. Values are centred
// (x - mean) before they are scaled, as ATen does, rather than folding the mean into
// one affine x * scale + shift, whose two large terms cancel when |mean| >> std.

#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "multiversion.h"

// The window loops select between values by comparisons (max, ReLU, the chosen
// element); under GCC's default -ftrapping-math a comparison that could raise an FP
// exception is not executed speculatively, so none of them vectorised (2.5x slower
// backward). pymeta never enables FP traps, so nothing changes but speed.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace pymeta {
namespace {

constexpr int kLanes = 8;

template <typename T>
PYMETA_INLINE double plane_sum(const T* p, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += p[i + k];
  }
  double s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  for (; i < n; ++i) s += p[i];
  return s;
}

template <typename T>
PYMETA_INLINE double plane_squared_deviation(const T* p, int64_t n, T mean) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += (p[i + k] - mean) * (p[i + k] - mean);
  }
  double s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  for (; i < n; ++i) s += double(p[i] - mean) * double(p[i] - mean);
  return s;
}

struct Shape {
  int64_t B, C, H, W, OH, OW;
  int64_t plane() const { return H * W; }
  int64_t out_plane() const { return OH * OW; }
};

// (mean, invstd) of channel c: its batch statistics (biased variance, as BatchNorm
// normalises with), or the running ones.
template <typename T>
PYMETA_INLINE std::pair<double, double> channel_statistics(const T* x, const Shape& s, int64_t c, const T* running_mean,
                                             const T* running_var, double eps) {
  if (running_mean != nullptr) {
    return {double(running_mean[c]), 1.0 / std::sqrt(double(running_var[c]) + eps)};
  }
  const double count = double(s.B * s.plane());
  double sum = 0;
  for (int64_t b = 0; b < s.B; ++b) sum += plane_sum(x + (b * s.C + c) * s.plane(), s.plane());
  const double mean = sum / count;
  double sq = 0;
  for (int64_t b = 0; b < s.B; ++b) sq += plane_squared_deviation(x + (b * s.C + c) * s.plane(), s.plane(), T(mean));
  return {mean, 1.0 / std::sqrt(sq / count + eps)};
}

// ATen's pooling rule, on x: a value takes over the window if it is greater (UP > 0),
// smaller (UP < 0) or NaN; with UP == 0 (scale 0: all of y is equal) the first stays.
template <int UP, typename T>
PYMETA_INLINE bool takes(T v, T best) {
  if constexpr (UP > 0) {
    return (v > best) | (v != v);  // bitwise: no branch, so loops vectorise
  } else if constexpr (UP < 0) {
    return (v < best) | (v != v);
  } else {
    return false;
  }
}

// The chosen value of window ow of the row pair (r0, r1), by takes<UP>.
template <int UP, typename T>
PYMETA_INLINE T window_best(const T* r0, const T* r1, int64_t ow) {
  T best = r0[2 * ow];
  best = takes<UP>(r0[2 * ow + 1], best) ? r0[2 * ow + 1] : best;
  best = takes<UP>(r1[2 * ow], best) ? r1[2 * ow] : best;
  return takes<UP>(r1[2 * ow + 1], best) ? r1[2 * ow + 1] : best;
}

// Windows are processed CH at a time in a fixed-length inner loop, which compiles to
// whole vectors with no scalar tail: a row's last chunk is shifted back to end at its
// last window (14 windows, CH = 8: windows 0-7 and 6-13), so the two chunks overlap.
// The writes are idempotent, so overlapped windows are simply written twice; the sums
// skip them. CH is 8 for rows of at least 8 windows, else 4, and rows of under 4 run a
// plain loop (CH = 0). conv4's 28-wide planes have 14 windows per row, which a plain
// loop ran as 8 in vectors and 6 in scalar, branchy code (about half the kernel's time).
// with_chunk_length calls body(std::integral_constant<int, CH>{}) with the CH of rows of
// OW windows; body must be PYMETA_LAMBDA_INLINE, as every callee of a target clone is inlined.
template <typename Body>
PYMETA_INLINE void with_chunk_length(int64_t OW, Body&& body) {
  if (OW >= 8) {
    body(std::integral_constant<int, 8>{});
  } else if (OW >= 4) {
    body(std::integral_constant<int, 4>{});
  } else {
    body(std::integral_constant<int, 0>{});
  }
}

// The first window of the chunk that starts at `start` (shifted back when it would run past OW).
template <int CH>
PYMETA_INLINE int64_t chunk_first(int64_t start, int64_t OW) { return start + CH <= OW ? start : OW - CH; }

template <int UP, typename T>
PYMETA_INLINE void forward_window(const T* r0, const T* r1, T* o, int64_t ow, T mean, T sc, T shift) {
  const T y = (window_best<UP>(r0, r1, ow) - mean) * sc + shift;
  o[ow] = ((y > 0) | (y != y)) ? y : T(0);
}

// One plane's windows, row pair by row pair; branch-free so that each loop vectorises.
template <int CH, int UP, typename T>
PYMETA_INLINE void forward_plane(const T* x, T* out, const Shape& s, T mean, T sc, T shift) {
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const T* r0 = x + 2 * oh * s.W;
    const T* r1 = r0 + s.W;
    T* o = out + oh * s.OW;
    if constexpr (CH == 0) {
#pragma omp simd
      for (int64_t ow = 0; ow < s.OW; ++ow) forward_window<UP>(r0, r1, o, ow, mean, sc, shift);
    } else {
      for (int64_t start = 0; start < s.OW; start += CH) {
        const int64_t first = chunk_first<CH>(start, s.OW);
#pragma omp simd
        for (int64_t k = 0; k < CH; ++k) forward_window<UP>(r0, r1, o, first + k, mean, sc, shift);
      }
    }
  }
}

// (sum gz, sum gz * (x[choice] - mean)) over one plane's windows; windows before
// `from` (a chunk's overlap with the previous one) count 0.
template <int UP, typename T>
PYMETA_INLINE void window_sums(const T* r0, const T* r1, const T* g, const T* o, int64_t ow, int64_t from, T mean,
                               T& sum1, T& sum2) {
  const T best = window_best<UP>(r0, r1, ow);
  const T gv = g[ow];  // loaded unconditionally: a conditional load kept the loop scalar
  const T gz = (o[ow] > 0) & (ow >= from) ? gv : T(0);
  sum1 += gz;
  sum2 += gz * (best - mean);
}

template <int CH, int UP, typename T>
PYMETA_INLINE std::pair<T, T> backward_sums_plane(const T* grad, const T* x, const T* out, const Shape& s, T mean) {
  T r1 = 0, r2 = 0;
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const T* r0 = x + 2 * oh * s.W;
    const T* rr = r0 + s.W;
    const T* g = grad + oh * s.OW;
    const T* o = out + oh * s.OW;
    if constexpr (CH == 0) {
#pragma omp simd reduction(+ : r1, r2)
      for (int64_t ow = 0; ow < s.OW; ++ow) window_sums<UP>(r0, rr, g, o, ow, 0, mean, r1, r2);
    } else {
      for (int64_t start = 0; start < s.OW; start += CH) {
        const int64_t first = chunk_first<CH>(start, s.OW);
#pragma omp simd reduction(+ : r1, r2)
        for (int64_t k = 0; k < CH; ++k) window_sums<UP>(r0, rr, g, o, first + k, start, mean, r1, r2);
      }
    }
  }
  return {r1, r2};
}

// Which of a window's four elements (x0 x1 / x2 x3) is its choice: the first equal to
// the chosen value (ATen's first-maximum rule). A NaN makes out NaN, whose ReLU mask is
// 0: nothing is routed through such a window. Flags come back through references: a
// returned struct of them kept GCC 12 from vectorising the window loops (4x slower).
template <int UP, typename T>
PYMETA_INLINE void window_choice(T x0, T x1, T x2, T x3, T best, bool& e0, bool& e1, bool& e2, bool& e3) {
  e0 = (UP == 0) | (x0 == best);
  e1 = !e0 & (x1 == best);
  const bool e01 = e0 | e1;
  e2 = !e01 & (x2 == best);
  e3 = !(e01 | e2);
}

// grad x of one window: a * (x - mean) + c0 at its four elements, plus sc * gz at its choice.
template <int UP, typename T>
PYMETA_INLINE void backward_window(const T* __restrict r0, const T* __restrict rr, const T* __restrict g,
                                   const T* __restrict o, T* __restrict q0, T* __restrict q1, int64_t ow, T mean,
                                   T a, T c0, T sc) {
  const T x0 = r0[2 * ow], x1 = r0[2 * ow + 1], x2 = rr[2 * ow], x3 = rr[2 * ow + 1];
  bool e0, e1, e2, e3;
  window_choice<UP>(x0, x1, x2, x3, window_best<UP>(r0, rr, ow), e0, e1, e2, e3);
  const T scaled = sc * g[ow];
  const T add = o[ow] > 0 ? scaled : T(0);
  q0[2 * ow] = a * (x0 - mean) + c0 + (e0 ? add : T(0));
  q0[2 * ow + 1] = a * (x1 - mean) + c0 + (e1 ? add : T(0));
  q1[2 * ow] = a * (x2 - mean) + c0 + (e2 ? add : T(0));
  q1[2 * ow + 1] = a * (x3 - mean) + c0 + (e3 ? add : T(0));
}

// grad x of one plane. Windows do not overlap: each of their elements is written once
// (twice where chunks overlap, with the same value), then the odd last column and row
// (in no window) get a * (x - mean) + c0.
template <int CH, int UP, typename T>
PYMETA_INLINE void backward_plane(const T* __restrict grad, const T* __restrict x, const T* __restrict out,
                           T* __restrict gx, const Shape& s, T mean, T a, T c0, T sc) {
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const T* r0 = x + 2 * oh * s.W;
    const T* rr = r0 + s.W;
    T* q0 = gx + 2 * oh * s.W;
    T* q1 = q0 + s.W;
    const T* g = grad + oh * s.OW;
    const T* o = out + oh * s.OW;
    if constexpr (CH == 0) {
#pragma omp simd
      for (int64_t ow = 0; ow < s.OW; ++ow) backward_window<UP>(r0, rr, g, o, q0, q1, ow, mean, a, c0, sc);
    } else {
      for (int64_t start = 0; start < s.OW; start += CH) {
        const int64_t first = chunk_first<CH>(start, s.OW);
#pragma omp simd
        for (int64_t k = 0; k < CH; ++k) backward_window<UP>(r0, rr, g, o, q0, q1, first + k, mean, a, c0, sc);
      }
    }
    if (s.W % 2) {
      q0[s.W - 1] = a * (r0[s.W - 1] - mean) + c0;
      q1[s.W - 1] = a * (rr[s.W - 1] - mean) + c0;
    }
  }
  if (s.H % 2) {
    for (int64_t j = (s.H - 1) * s.W; j < s.plane(); ++j) gx[j] = a * (x[j] - mean) + c0;
  }
}

template <int UP, typename T>
PYMETA_INLINE void forward_channel_dir(const T* x, T* out, const Shape& s, int64_t c, T mean, T sc, T shift) {
  with_chunk_length(s.OW, [&](auto ch) PYMETA_LAMBDA_INLINE {
    constexpr int CH = decltype(ch)::value;
    for (int64_t b = 0; b < s.B; ++b) {
      forward_plane<CH, UP>(x + (b * s.C + c) * s.plane(), out + (b * s.C + c) * s.out_plane(), s, mean, sc, shift);
    }
  });
}

template <typename T>
PYMETA_INLINE void forward_channel(const T* x, T* out, const Shape& s, int64_t c, const T* weight, const T* bias,
                                   const T* running_mean, const T* running_var, double eps) {
  const auto [mean, invstd] = channel_statistics(x, s, c, running_mean, running_var, eps);
  const double scale = double(weight[c]) * invstd;
  const T m = T(mean), sc = T(scale), shift = bias[c];
  if (scale > 0) {
    forward_channel_dir<1>(x, out, s, c, m, sc, shift);
  } else if (scale < 0) {
    forward_channel_dir<-1>(x, out, s, c, m, sc, shift);
  } else {
    forward_channel_dir<0>(x, out, s, c, m, sc, shift);
  }
}

template <int UP, typename T>
PYMETA_INLINE void backward_channel_dir(const T* grad, const T* x, const T* out, T* gx, double* gw, double* gb,
                                        const Shape& s, int64_t c, double mean, double invstd, double scale,
                                        bool train) {
  with_chunk_length(s.OW, [&](auto ch) PYMETA_LAMBDA_INLINE {
    constexpr int CH = decltype(ch)::value;
    double s1 = 0, s2 = 0;
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t o = (b * s.C + c) * s.out_plane();
      const auto [r1, r2] = backward_sums_plane<CH, UP>(grad + o, x + (b * s.C + c) * s.plane(), out + o, s, T(mean));
      s1 += r1;
      s2 += double(r2) * invstd;
    }
    *gb = s1;
    *gw = s2;
    const double count = double(s.B * s.plane());
    const T a = train ? T(-scale * s2 * invstd / count) : T(0);
    const T c0 = train ? T(-scale * s1 / count) : T(0);
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t o = (b * s.C + c) * s.out_plane(), i = (b * s.C + c) * s.plane();
      backward_plane<CH, UP>(grad + o, x + i, out + o, gx + i, s, T(mean), a, c0, T(scale));
    }
  });
}

template <typename T>
PYMETA_INLINE void backward_channel(const T* grad, const T* x, const T* out, T* gx, double* gw, double* gb,
                                    const Shape& s, int64_t c, const T* weight, const T* running_mean,
                                    const T* running_var, double eps) {
  const auto [mean, invstd] = channel_statistics(x, s, c, running_mean, running_var, eps);
  const double scale = double(weight[c]) * invstd;
  const bool train = running_mean == nullptr;
  if (scale > 0) {
    backward_channel_dir<1>(grad, x, out, gx, gw, gb, s, c, mean, invstd, scale, train);
  } else if (scale < 0) {
    backward_channel_dir<-1>(grad, x, out, gx, gw, gb, s, c, mean, invstd, scale, train);
  } else {
    backward_channel_dir<0>(grad, x, out, gx, gw, gb, s, c, mean, invstd, scale, train);
  }
}

}  // namespace
}  // namespace pymeta
