// 3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray,
// "Fast Algorithms for Convolutional Neural Networks", CVPR 2016, arXiv:1509.09308):
// what grouped_conv2d.cpp runs for a layer with more than a few input channels per
// group, the 64-channel layers of conv4 and ResNet-12-like backbones.
//
// Each 2x2 block of outputs ("tile") of a plane is A^T [(G w G^T) . (B^T d B)] A, with d
// the 4x4 block of (zero-padded) input under it and . the elementwise product. Summed over
// input channels, the 16 elementwise products of all tiles are 16 matrix products,
//   M[xi] = U[xi] V[xi],  U[xi]: [Co, Ci] transformed filters, V[xi]: [Ci, tiles],
// 16 * Co * Ci multiply-adds per tile of 4 outputs against 36 * Co * Ci directly (2.25x
// fewer), and they run in the BLAS that torch.mm uses, at the machine's matmul speed on
// any CPU (oneDNN's direct fp32 kernels run the 64-channel layers of conv4 at about 60%
// of it on an AVX2 machine). The transforms are adds and subtractions over rows, with no
// product of the constants but the 1/2 in G: F(2x2, 3x3)'s float32 error is that of a
// direct convolution's order (Lavin and Gray, section 5).
//
// The weight gradient is this computation's adjoint: dM = A dY A^T per tile,
// dU[xi] = sum over tiles of dM[xi] V[xi]^T, dW = G^T dU G. The input gradient is the
// forward with the flipped, transposed filters (grouped_conv2d.cpp).
//
// Layouts: x [B, G*Ci, H, W], weight [G*Co, Ci, 3, 3], out [B, G*Co, Ho, Wo] (NCHW
// contiguous); U [G, 16, Co, Ci], and V [g, 16, Ci, P] and M [g, 16, Co, P] over the P
// tiles of a chunk of g groups and some images, sized so that both stay in the cache
// levels BLAS and the transforms share (conv4 under torch.compile runs its 32 tasks as 32
// groups of 64 channels: one group at a time).

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "conv_taps.h"
#include "multiversion.h"

namespace pymeta {
namespace {

// A chunk: about WINOGRAD_TILE_TARGET tiles of WINOGRAD_CHUNK_CHANNELS channels, V and M
// 1 MB each in float32. On [75, 64, 14, 14], 1 thread, 128 to 512 tiles were alike and 1024
// slower (the chunk no longer in L2 between the transforms and the product); 32 groups of
// 64 channels in one chunk of 5 images (32 MB) ran at half the speed of one group's.
constexpr int64_t WINOGRAD_TILE_TARGET = 256;
constexpr int64_t WINOGRAD_CHUNK_CHANNELS = 64;

struct Tiling {
  int64_t th, tw;    // tiles down and across a plane: ceil(Ho / 2), ceil(Wo / 2)
  int64_t images;    // images per chunk
  int64_t groups;    // groups per chunk
  int64_t tiles() const { return th * tw; }
};

inline Tiling tiling(const ConvShape& s) {
  const int64_t th = (s.Ho + 1) / 2, tw = (s.Wo + 1) / 2;
  // At least 1 of each, also for an empty batch (B = 0: no chunk runs).
  return {th, tw, std::max<int64_t>(1, std::min(WINOGRAD_TILE_TARGET / (th * tw), s.B)),
          std::max<int64_t>(1, std::min(WINOGRAD_CHUNK_CHANNELS / std::max(s.Ci, s.Co), s.G))};
}

// A plane's rows split into even and odd columns, zero-padded: plane (y, x) goes to row
// y + ph, column x + pw, of a [rows, 2n] grid whose even columns are even[r * n + k]
// and odd ones odd[r * n + k]. Tile (ty, tx) reads grid rows 2ty .. 2ty + 3 and columns
// 2tx .. 2tx + 3, that is even and odd columns tx and tx + 1: contiguous in tx, so the
// transforms below load a vector of tiles at once. buf: 2 * rows * n scalars.
template <typename T>
PYMETA_INLINE void split_columns(const T* plane, int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t rows, int64_t n,
                                 T* buf) {
  T *even = buf, *odd = buf + rows * n;
  std::fill(buf, buf + 2 * rows * n, T(0));
  for (int64_t y = 0; y < H && y + ph < rows; ++y) {
    const T* in = plane + y * W;
    T *e = even + (y + ph) * n, *o = odd + (y + ph) * n;
    const int64_t width = std::min(W, 2 * n - pw);  // grid columns past 2n are never read
    // x + pw even -> e[(x + pw) / 2], odd -> o[...]: two strided loops, no branch.
    for (int64_t x = pw % 2; x < width; x += 2) e[(x + pw) / 2] = in[x];
    for (int64_t x = 1 - pw % 2; x < width; x += 2) o[(x + pw) / 2] = in[x];
  }
}

// Columns the split grid of an input plane needs past its last tile: n = tw + 1 + L.
template <typename T>
int64_t split_width(const Tiling& t) {
  return t.tw + 1 + Lanes<T>::L;
}

// One input plane [H, W] -> its tiles' B^T d B, v[xi * stride + ty * tw + tx], for
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], L tiles at a time. A row's last vector
// writes up to L - 1 values past its tiles: into the next row's or the next image's
// tiles, which are written after, or into the L values of slack after a chunk's tiles.
template <typename T>
PYMETA_INLINE void input_tiles(const T* plane, const ConvShape& s, const Tiling& t, T* v, int64_t stride, T* buf) {
  using V = Lanes<T>;
  typedef typename V::vec vec;
  const int64_t rows = 2 * t.th + 2, n = split_width<T>(t);
  split_columns(plane, s.H, s.W, s.ph, s.pw, rows, n, buf);
  const T *even = buf, *odd = buf + rows * n;
  for (int64_t ty = 0; ty < t.th; ++ty) {
    for (int64_t tx = 0; tx < t.tw; tx += V::L) {
      vec d[4][4];  // d[r][j]: grid row 2ty + r, across-transformed column j
      for (int r = 0; r < 4; ++r) {
        const int64_t at = (2 * ty + r) * n + tx;
        const vec c0 = V::load(even + at), c1 = V::load(odd + at), c2 = V::load(even + at + 1),
                  c3 = V::load(odd + at + 1);
        d[r][0] = c0 - c2;
        d[r][1] = c1 + c2;
        d[r][2] = c2 - c1;
        d[r][3] = c1 - c3;
      }
      T* out = v + ty * t.tw + tx;
      for (int j = 0; j < 4; ++j) {
        V::store(out + j * stride, d[0][j] - d[2][j]);
        V::store(out + (4 + j) * stride, d[1][j] + d[2][j]);
        V::store(out + (8 + j) * stride, d[2][j] - d[1][j]);
        V::store(out + (12 + j) * stride, d[1][j] - d[3][j]);
      }
    }
  }
}

// One output plane [Ho, Wo] from its tiles' products m[xi * stride + ty * tw + tx] (which
// can be read up to L - 1 values past the last tile): A^T m A + bias, A^T = [1 1 1 0; 0 1 -1 -1].
template <typename T>
PYMETA_INLINE void output_plane(const T* m, const ConvShape& s, const Tiling& t, int64_t stride, T bias, T* plane) {
  using V = Lanes<T>;
  typedef typename V::vec vec;
  for (int64_t ty = 0; ty < t.th; ++ty) {
    for (int64_t tx = 0; tx < t.tw; tx += V::L) {
      const T* in = m + ty * t.tw + tx;
      vec s0[4], s1[4];
      for (int j = 0; j < 4; ++j) {
        const vec m0 = V::load(in + j * stride), m1 = V::load(in + (4 + j) * stride),
                  m2 = V::load(in + (8 + j) * stride), m3 = V::load(in + (12 + j) * stride);
        s0[j] = m0 + m1 + m2;
        s1[j] = m1 - m2 - m3;
      }
      T y[2][2][V::L];  // y[a][b][k]: output (2ty + a, 2(tx + k) + b)
      V::store(y[0][0], s0[0] + s0[1] + s0[2] + bias);
      V::store(y[0][1], s0[1] - s0[2] - s0[3] + bias);
      V::store(y[1][0], s1[0] + s1[1] + s1[2] + bias);
      V::store(y[1][1], s1[1] - s1[2] - s1[3] + bias);
      const int64_t width = std::min(2 * V::L, s.Wo - 2 * tx);
      for (int a = 0; a < 2 && 2 * ty + a < s.Ho; ++a) {
        T* out = plane + (2 * ty + a) * s.Wo + 2 * tx;
        for (int64_t k = 0; k < width / 2; ++k) {
          out[2 * k] = y[a][0][k];
          out[2 * k + 1] = y[a][1][k];
        }
        if (width % 2) out[width - 1] = y[a][0][width / 2];
      }
    }
  }
}

// One output-gradient plane [Ho, Wo] -> its tiles' A dY A^T, dm[xi * stride + ty * tw + tx]
// (outputs past Ho, Wo that the last tiles cover have gradient 0), A = [1 0; 1 1; 1 -1;
// 0 -1]; past each row's tiles as input_tiles. buf: 2 * 2th * (tw + L) scalars.
template <typename T>
PYMETA_INLINE void grad_tiles(const T* plane, const ConvShape& s, const Tiling& t, T* dm, int64_t stride, T* buf) {
  using V = Lanes<T>;
  typedef typename V::vec vec;
  const int64_t rows = 2 * t.th, n = t.tw + V::L;
  split_columns(plane, s.Ho, s.Wo, 0, 0, rows, n, buf);
  const T *even = buf, *odd = buf + rows * n;
  for (int64_t ty = 0; ty < t.th; ++ty) {
    for (int64_t tx = 0; tx < t.tw; tx += V::L) {
      const int64_t at = 2 * ty * n + tx;
      const vec d00 = V::load(even + at), d01 = V::load(odd + at), d10 = V::load(even + at + n),
                d11 = V::load(odd + at + n);
      const vec r[4][2] = {{d00, d01}, {d00 + d10, d01 + d11}, {d00 - d10, d01 - d11}, {-d10, -d11}};  // A dY
      T* out = dm + ty * t.tw + tx;
      for (int i = 0; i < 4; ++i) {  // (A dY) A^T
        V::store(out + (4 * i) * stride, r[i][0]);
        V::store(out + (4 * i + 1) * stride, r[i][0] + r[i][1]);
        V::store(out + (4 * i + 2) * stride, r[i][0] - r[i][1]);
        V::store(out + (4 * i + 3) * stride, -r[i][1]);
      }
    }
  }
}

// The kernels' loops over channels [first, last) of a chunk (channel c: group c / Cg, its
// channel c % Cg, Cg = Ci or Co; the chunk's first channel is c0 of the tensor's) and its
// nb images from image b0, multiversioned (target_clones wants plain functions, not
// templates). A chunk's tiles are [g, 16, Cg, row]: rows of P tiles, image by image,
// and for V and dM, L values of slack (row = P + L). One thread runs all images of a
// channel, in order (see input_tiles).
PYMETA_INLINE int64_t tile_rows(int64_t c, int64_t Cg, int64_t row) {  // offset of channel c's [16, row] rows
  return (c / Cg * 16 * Cg + c % Cg) * row;
}

#define PYMETA_WINOGRAD_LOOPS(T)                                                                                   \
  PYMETA_MULTIVERSION void winograd_input_tiles(const T* x, const ConvShape& s, const Tiling& t, int64_t c0,     \
                                                int64_t b0, int64_t nb, int64_t first, int64_t last, T* v,       \
                                                int64_t row, T* buf) {                                           \
    for (int64_t c = first; c < last; ++c) {                                                                     \
      T* tiles = v + tile_rows(c, s.Ci, row);                                                                   \
      for (int64_t b = 0; b < nb; ++b) {                                                                         \
        input_tiles(x + ((b0 + b) * s.G * s.Ci + c0 + c) * s.H * s.W, s, t, tiles + b * t.tiles(), s.Ci * row,  \
                    buf);                                                                                        \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
  PYMETA_MULTIVERSION void winograd_output_planes(const T* m, const ConvShape& s, const Tiling& t, int64_t c0,   \
                                                  int64_t b0, int64_t nb, int64_t first, int64_t last,           \
                                                  const T* bias, T* out) {                                       \
    const int64_t P = nb * t.tiles();                                                                            \
    for (int64_t c = first; c < last; ++c) {                                                                     \
      const T* products = m + tile_rows(c, s.Co, P);                                                            \
      const T b_c = bias == nullptr ? T(0) : bias[c0 + c];                                                       \
      for (int64_t b = 0; b < nb; ++b) {                                                                         \
        output_plane(products + b * t.tiles(), s, t, s.Co * P, b_c,                                              \
                     out + ((b0 + b) * s.G * s.Co + c0 + c) * s.Ho * s.Wo);                                      \
      }                                                                                                          \
    }                                                                                                            \
  }                                                                                                              \
  PYMETA_MULTIVERSION void winograd_grad_tiles(const T* grad, const ConvShape& s, const Tiling& t, int64_t c0,  \
                                               int64_t b0, int64_t nb, int64_t first, int64_t last, T* dm,       \
                                               int64_t row, T* buf) {                                            \
    for (int64_t c = first; c < last; ++c) {                                                                     \
      T* tiles = dm + tile_rows(c, s.Co, row);                                                                  \
      for (int64_t b = 0; b < nb; ++b) {                                                                         \
        grad_tiles(grad + ((b0 + b) * s.G * s.Co + c0 + c) * s.Ho * s.Wo, s, t, tiles + b * t.tiles(),           \
                   s.Co * row, buf);                                                                             \
      }                                                                                                          \
    }                                                                                                            \
  }
PYMETA_WINOGRAD_LOOPS(float)
PYMETA_WINOGRAD_LOOPS(double)
#undef PYMETA_WINOGRAD_LOOPS

// U[g][xi][o][c] = (G w[g*Co + o][c] G^T)[xi] for weight [G*Co, Ci, 3, 3] -> U [G, 16, Co, Ci]
// (per_group = Co * Ci filters), G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1].
template <typename T>
void transform_filters(const T* w, int64_t filters, int64_t per_group, T* U) {
  for (int64_t f = 0; f < filters; ++f) {
    const T* g = w + 9 * f;
    T* u = U + f / per_group * 16 * per_group + f % per_group;  // u[xi * per_group]
    T gw[4][3];  // G w
    for (int k = 0; k < 3; ++k) {
      gw[0][k] = g[k];
      gw[1][k] = (g[k] + g[3 + k] + g[6 + k]) / 2;
      gw[2][k] = (g[k] - g[3 + k] + g[6 + k]) / 2;
      gw[3][k] = g[6 + k];
    }
    for (int i = 0; i < 4; ++i) {  // (G w) G^T
      u[(4 * i) * per_group] = gw[i][0];
      u[(4 * i + 1) * per_group] = (gw[i][0] + gw[i][1] + gw[i][2]) / 2;
      u[(4 * i + 2) * per_group] = (gw[i][0] - gw[i][1] + gw[i][2]) / 2;
      u[(4 * i + 3) * per_group] = gw[i][2];
    }
  }
}

// The adjoint: dW[o][c] = G^T dU[o][c] G for dU [G, 16, Co, Ci] -> dW [G*Co, Ci, 3, 3].
template <typename T>
void untransform_filters(const T* dU, int64_t filters, int64_t per_group, T* dw) {
  for (int64_t f = 0; f < filters; ++f) {
    const T* du = dU + f / per_group * 16 * per_group + f % per_group;
    T u[4][4], r[4][3];  // r = dU G
    for (int xi = 0; xi < 16; ++xi) u[xi / 4][xi % 4] = du[xi * per_group];
    for (int i = 0; i < 4; ++i) {
      r[i][0] = u[i][0] + (u[i][1] + u[i][2]) / 2;
      r[i][1] = (u[i][1] - u[i][2]) / 2;
      r[i][2] = (u[i][1] + u[i][2]) / 2 + u[i][3];
    }
    T* g = dw + 9 * f;
    for (int k = 0; k < 3; ++k) {  // G^T r
      g[k] = r[0][k] + (r[1][k] + r[2][k]) / 2;
      g[3 + k] = (r[1][k] - r[2][k]) / 2;
      g[6 + k] = (r[1][k] + r[2][k]) / 2 + r[3][k];
    }
  }
}

// Scratch for one thread's split grids: the larger of input_tiles' and grad_tiles'.
template <typename T>
std::vector<T> split_buffer(const Tiling& t) {
  return std::vector<T>(2 * (2 * t.th + 2) * split_width<T>(t));
}

// A chunk's tiles [g * 16, Cg, P] in a buffer of rows `row` apart, as a strided view that
// BLAS reads without a copy.
inline at::Tensor chunk_tiles(const at::Tensor& buffer, int64_t groups, int64_t Cg, int64_t P, int64_t row) {
  return buffer.as_strided({16 * groups, Cg, P}, {Cg * row, row, 1});
}

// Runs body(g0, ng, b0, nb, v) over chunks of ng groups from group g0 and nb images from
// image b0, v: the chunk's input tiles (chunk_tiles), in one buffer every chunk reuses.
template <typename T, typename Body>
void for_each_chunk(const at::Tensor& x, const ConvShape& s, const Tiling& t, const Body& body) {
  const int64_t row = t.images * t.tiles() + Lanes<T>::L;
  at::Tensor buffer = at::empty({16 * t.groups * s.Ci * row}, x.options());
  const T* in = x.const_data_ptr<T>();
  T* tiles = buffer.mutable_data_ptr<T>();
  for (int64_t g0 = 0; g0 < s.G; g0 += t.groups) {
    const int64_t ng = std::min(t.groups, s.G - g0);
    for (int64_t b0 = 0; b0 < s.B; b0 += t.images) {
      const int64_t nb = std::min(t.images, s.B - b0);
      at::parallel_for(0, ng * s.Ci, 1, [&](int64_t first, int64_t last) {
        std::vector<T> buf = split_buffer<T>(t);
        winograd_input_tiles(in, s, t, g0 * s.Ci, b0, nb, first, last, tiles, row, buf.data());
      });
      body(g0, ng, b0, nb, chunk_tiles(buffer, ng, s.Ci, nb * t.tiles(), row));
    }
  }
}

// x [B, G*Ci, H, W], weight [G*Co, Ci, 3, 3], bias [G*Co] or none -> [B, G*Co, Ho, Wo].
inline at::Tensor winograd_forward(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const ConvShape& s) {
  const Tiling t = tiling(s);
  at::Tensor out = at::empty({s.B, s.G * s.Co, s.Ho, s.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_winograd_forward", [&] {
    at::Tensor U = at::empty({s.G * 16, s.Co, s.Ci}, x.options());
    transform_filters(weight.const_data_ptr<scalar_t>(), s.G * s.Co * s.Ci, s.Co * s.Ci, U.mutable_data_ptr<scalar_t>());
    // + L: output_plane's vectors read up to L - 1 values past the last tile.
    at::Tensor products = at::empty({16 * t.groups * s.Co * t.images * t.tiles() + Lanes<scalar_t>::L}, x.options());
    const scalar_t* b = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for_each_chunk<scalar_t>(x, s, t, [&](int64_t g0, int64_t ng, int64_t b0, int64_t nb, const at::Tensor& v) {
      const int64_t P = nb * t.tiles();
      at::Tensor m = products.narrow(0, 0, 16 * ng * s.Co * P).view({16 * ng, s.Co, P});
      at::bmm_out(m, U.narrow(0, 16 * g0, 16 * ng), v);
      const scalar_t* mp = products.const_data_ptr<scalar_t>();
      at::parallel_for(0, ng * s.Co, 1, [&](int64_t first, int64_t last) {
        winograd_output_planes(mp, s, t, g0 * s.Co, b0, nb, first, last, b, o);
      });
    });
  });
  return out;
}

// grad [B, G*Co, Ho, Wo], x [B, G*Ci, H, W] -> the weight gradient [G*Co, Ci, 3, 3].
inline at::Tensor winograd_weight_grad(const at::Tensor& grad, const at::Tensor& x, const ConvShape& s) {
  const Tiling t = tiling(s);
  at::Tensor dU = at::zeros({s.G * 16, s.Co, s.Ci}, x.options()), dw = at::empty({s.G * s.Co, s.Ci, 3, 3}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_winograd_weight_grad", [&] {
    const int64_t row = t.images * t.tiles() + Lanes<scalar_t>::L;
    at::Tensor buffer = at::empty({16 * t.groups * s.Co * row}, x.options());
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* dmp = buffer.mutable_data_ptr<scalar_t>();
    for_each_chunk<scalar_t>(x, s, t, [&](int64_t g0, int64_t ng, int64_t b0, int64_t nb, const at::Tensor& v) {
      at::parallel_for(0, ng * s.Co, 1, [&](int64_t first, int64_t last) {
        std::vector<scalar_t> buf = split_buffer<scalar_t>(t);
        winograd_grad_tiles(g, s, t, g0 * s.Co, b0, nb, first, last, dmp, row, buf.data());
      });
      dU.narrow(0, 16 * g0, 16 * ng).baddbmm_(chunk_tiles(buffer, ng, s.Co, nb * t.tiles(), row), v.transpose(1, 2));
    });
    untransform_filters(dU.const_data_ptr<scalar_t>(), s.G * s.Co * s.Ci, s.Co * s.Ci, dw.mutable_data_ptr<scalar_t>());
  });
  return dw;
}

}  // namespace
}  // namespace pymeta
