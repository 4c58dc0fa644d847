// Max pooling forward with indices on NCHW CPU tensors, no padding or dilation: what
// pymeta.ops.max_pool2d's forward runs. ATen's NCHW kernel is ~4x slower than its
// channels-last one, and converting to channels-last and back costs more than the
// pooling; this kernel reads the NCHW planes in place (conv4 [75, 64, 28, 28], 1
// thread: 2.3 ms against 6.1 ms for the channels-last round trip, see
// benchmarks/bench_max_pool2d.py; planes narrower than 16 stay on channels-last).
//
// Same results as ATen, bit for bit (see pool_windows.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "multiversion.h"
#include "pool_windows.h"

namespace pymeta {
namespace {

// The 2x2 / stride 2 window of conv nets, unrolled and branch-free so it vectorises.
template <typename scalar_t>
inline void pool_plane_2x2(const scalar_t* in, scalar_t* out, int64_t* idx, int64_t W, int64_t OH, int64_t OW) {
  for (int64_t oh = 0; oh < OH; ++oh) {
    const scalar_t* r0 = in + 2 * oh * W;
    const scalar_t* r1 = r0 + W;
    const int64_t base = 2 * oh * W;
    for (int64_t ow = 0; ow < OW; ++ow) {
      scalar_t best = r0[2 * ow];
      int64_t where = base + 2 * ow;
      scalar_t v = r0[2 * ow + 1];
      bool t = take(v, best);
      best = t ? v : best;
      where = t ? base + 2 * ow + 1 : where;
      v = r1[2 * ow];
      t = take(v, best);
      best = t ? v : best;
      where = t ? base + W + 2 * ow : where;
      v = r1[2 * ow + 1];
      t = take(v, best);
      best = t ? v : best;
      where = t ? base + W + 2 * ow + 1 : where;
      out[oh * OW + ow] = best;
      idx[oh * OW + ow] = where;
    }
  }
}

// Multiversioned entry points (target_clones wants plain functions, not templates); the
// inlined template body is compiled for each target.
PYMETA_MULTIVERSION void pool_plane_2x2_float(const float* in, float* out, int64_t* idx, int64_t W, int64_t OH,
                                              int64_t OW) {
  pool_plane_2x2(in, out, idx, W, OH, OW);
}

PYMETA_MULTIVERSION void pool_plane_2x2_double(const double* in, double* out, int64_t* idx, int64_t W, int64_t OH,
                                               int64_t OW) {
  pool_plane_2x2(in, out, idx, W, OH, OW);
}

inline void pool_plane_2x2_any(const float* in, float* out, int64_t* idx, int64_t W, int64_t OH, int64_t OW) {
  pool_plane_2x2_float(in, out, idx, W, OH, OW);
}

inline void pool_plane_2x2_any(const double* in, double* out, int64_t* idx, int64_t W, int64_t OH, int64_t OW) {
  pool_plane_2x2_double(in, out, idx, W, OH, OW);
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel,
                                                  at::IntArrayRef stride) {
  TORCH_CHECK_VALUE(input.dim() == 4, "input must be [N, C, H, W], got shape ", input.sizes());
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2, "kernel and stride must have 2 values, got ", kernel,
                    " and ", stride);
  TORCH_CHECK_VALUE(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1,
                    "kernel and stride must be >= 1, got ", kernel, " and ", stride);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK_VALUE(H >= kernel[0] && W >= kernel[1], "input plane ", H, "x", W, " is smaller than the kernel ",
                    kernel);
  const int64_t OH = (H - kernel[0]) / stride[0] + 1, OW = (W - kernel[1]) / stride[1] + 1;
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty({N, C, OH, OW}, x.options());
  at::Tensor indices = at::empty({N, C, OH, OW}, x.options().dtype(at::kLong));
  Windows w;
  for (int64_t oh = 0; oh < OH; ++oh) w.rows.insert(w.rows.end(), {oh * stride[0], oh * stride[0] + kernel[0]});
  for (int64_t ow = 0; ow < OW; ++ow) w.cols.insert(w.cols.end(), {ow * stride[1], ow * stride[1] + kernel[1]});
  const bool two_by_two = kernel[0] == 2 && kernel[1] == 2 && stride[0] == 2 && stride[1] == 2;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_max_pool2d", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    int64_t* ix = indices.mutable_data_ptr<int64_t>();
    // Grain: enough planes per task that a small plane's dispatch cost is amortised.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        if (two_by_two) {
          pool_plane_2x2_any(in + p * H * W, o + p * OH * OW, ix + p * OH * OW, W, OH, OW);
        } else {
          pool_plane(in + p * H * W, o + p * OH * OW, ix + p * OH * OW, W, w);
        }
      }
    });
  });
  return {out, indices};
}

}  // namespace
}  // namespace pymeta

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("max_pool2d(Tensor input, int[] kernel, int[] stride) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("max_pool2d", &pymeta::max_pool2d_cpu);
}
