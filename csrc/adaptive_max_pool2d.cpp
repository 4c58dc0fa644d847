// Adaptive max pooling forward with indices on NCHW CPU tensors: what
// pymeta.ops.adaptive_max_pool2d's forward runs. ATen's NCHW kernel is slow on the small
// planes of a Relation Network's module (the paper's AdaptiveMaxPool2d((5, 5)) on
// [375, 64, 7, 7] pairs, 1 thread: 29 ms, ~16x its channels-last kernel), and so was a
// plain scalar loop over each plane's windows (21 ms: branch mispredictions, see
// pool_planes); this kernel pools 8 NCHW planes at a time in place, one per vector lane
// (3 ms, see benchmarks/bench_max_pool2d.py).
//
// Windows as ATen's (aten/src/ATen/native/AdaptivePooling.h): output row oh pools input
// rows [floor(oh * H / OH), ceil((oh + 1) * H / OH)), columns alike; values and indices
// bit for bit ATen's (pool_windows.h), the indices as int32 (positions in a plane of
// fewer than 2^31 elements): half the memory of ATen's int64 ones, which autograd keeps
// until the backward, adaptive_max_pool2d_backward (a scatter-add by them, in ATen's order).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>
#include <tuple>

#include "multiversion.h"
#include "pool_windows.h"

namespace pymeta {
namespace {

// [begin, end) input bounds of each of `out` adaptive windows over `in` positions.
std::vector<int64_t> adaptive_bounds(int64_t in, int64_t out) {
  std::vector<int64_t> bounds;
  for (int64_t o = 0; o < out; ++o) {
    bounds.push_back(o * in / out);
    bounds.push_back(((o + 1) * in + out - 1) / out);
  }
  return bounds;
}

// Planes pooled together, one per vector lane: a block of LANES planes is transposed
// into `scratch` ([H * W, LANES], in L1) so that every window step is one branch-free
// vector compare-and-select across the block. The scalar plane loop (pool_plane) is
// branchy, and on random data its mispredictions, not the comparisons, were the time.
constexpr int64_t LANES = 8;

template <typename scalar_t>
PYMETA_INLINE void pool_planes(const scalar_t* in, scalar_t* out, int32_t* idx, int64_t planes, int64_t W,
                               int64_t HW, const Windows& w, scalar_t* scratch) {
  const int64_t OH = w.out_height(), OW = w.out_width(), OHW = OH * OW;
  int64_t p = 0;
  for (; p + LANES <= planes; p += LANES) {
    const scalar_t* block = in + p * HW;
    for (int64_t k = 0; k < HW; ++k) {
      for (int64_t l = 0; l < LANES; ++l) scratch[k * LANES + l] = block[l * HW + k];
    }
    for (int64_t oh = 0; oh < OH; ++oh) {
      const int64_t row0 = w.rows[2 * oh], row1 = w.rows[2 * oh + 1];
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t col0 = w.cols[2 * ow], col1 = w.cols[2 * ow + 1];
        const int64_t first = row0 * W + col0;
        scalar_t best[LANES];
        int32_t where[LANES];
        for (int64_t l = 0; l < LANES; ++l) {
          best[l] = scratch[first * LANES + l];
          where[l] = static_cast<int32_t>(first);
        }
        for (int64_t i = row0; i < row1; ++i) {
          for (int64_t j = (i == row0 ? col0 + 1 : col0); j < col1; ++j) {
            const int64_t at = i * W + j;
            // GCC unrolls this loop into branchy scalar code unless told it is a vector loop.
#pragma omp simd
            for (int64_t l = 0; l < LANES; ++l) {
              const scalar_t v = scratch[at * LANES + l];
              const bool t = (v > best[l]) | (v != v);  // take(), without a branch
              best[l] = t ? v : best[l];
              where[l] = t ? static_cast<int32_t>(at) : where[l];
            }
          }
        }
        const int64_t o = oh * OW + ow;
        for (int64_t l = 0; l < LANES; ++l) {
          out[(p + l) * OHW + o] = best[l];
          idx[(p + l) * OHW + o] = where[l];
        }
      }
    }
  }
  for (; p < planes; ++p) pool_plane(in + p * HW, out + p * OHW, idx + p * OHW, W, w);
}

// Multiversioned entry points (target_clones wants plain functions, not templates).
PYMETA_MULTIVERSION void pool_planes_float(const float* in, float* out, int32_t* idx, int64_t planes, int64_t W,
                                           int64_t HW, const Windows& w, float* scratch) {
  pool_planes(in, out, idx, planes, W, HW, w, scratch);
}

PYMETA_MULTIVERSION void pool_planes_double(const double* in, double* out, int32_t* idx, int64_t planes, int64_t W,
                                            int64_t HW, const Windows& w, double* scratch) {
  pool_planes(in, out, idx, planes, W, HW, w, scratch);
}

inline void pool_planes_any(const float* in, float* out, int32_t* idx, int64_t planes, int64_t W, int64_t HW,
                            const Windows& w, float* scratch) {
  pool_planes_float(in, out, idx, planes, W, HW, w, scratch);
}

inline void pool_planes_any(const double* in, double* out, int32_t* idx, int64_t planes, int64_t W, int64_t HW,
                            const Windows& w, double* scratch) {
  pool_planes_double(in, out, idx, planes, W, HW, w, scratch);
}

std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef output_size) {
  TORCH_CHECK_VALUE(input.dim() == 4, "input must be [N, C, H, W], got shape ", input.sizes());
  TORCH_CHECK_VALUE(output_size.size() == 2 && output_size[0] >= 1 && output_size[1] >= 1,
                    "output_size must be 2 values >= 1, got ", output_size);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, "input planes must not be empty, got shape ", input.sizes());
  TORCH_CHECK_VALUE(H * W <= INT32_MAX, "input planes must have at most 2^31 - 1 elements, got shape ", input.sizes());
  const Windows w{adaptive_bounds(H, output_size[0]), adaptive_bounds(W, output_size[1])};
  const int64_t OH = output_size[0], OW = output_size[1];
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty({N, C, OH, OW}, x.options());
  at::Tensor indices = at::empty({N, C, OH, OW}, x.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pymeta_adaptive_max_pool2d", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    int32_t* ix = indices.mutable_data_ptr<int32_t>();
    // Grain: whole blocks, enough planes per task that a small plane's dispatch cost is amortised.
    const int64_t grain = LANES * std::max<int64_t>(1, 16384 / (LANES * H * W));
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(H * W * LANES);
      pool_planes_any(in + begin * H * W, o + begin * OH * OW, ix + begin * OH * OW, end - begin, W, H * W, w,
                      scratch.data());
    });
  });
  return {out, indices};
}

// grad_input [N, C, H, W] of grad [N, C, OH, OW]: each plane's gradients added at their
// indices, outputs in order (ATen's adaptive_max_pool2d_backward order, so overlapping
// windows sum alike).
at::Tensor adaptive_max_pool2d_backward_cpu(const at::Tensor& grad, const at::Tensor& indices,
                                            at::IntArrayRef input_size) {
  TORCH_CHECK_VALUE(grad.dim() == 4 && indices.sizes() == grad.sizes(),
                    "grad and indices must be [N, C, OH, OW] of one shape, got ", grad.sizes(), " and ",
                    indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, "indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(input_size.size() == 2 && input_size[0] >= 1 && input_size[1] >= 1,
                    "input_size must be 2 values >= 1, got ", input_size);
  const int64_t planes = grad.size(0) * grad.size(1), OHW = grad.size(2) * grad.size(3);
  const int64_t HW = input_size[0] * input_size[1];
  const at::Tensor g = grad.contiguous(), ix = indices.contiguous();
  at::Tensor out = at::zeros({grad.size(0), grad.size(1), input_size[0], input_size[1]}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "pymeta_adaptive_max_pool2d_backward",
                                  [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    const int32_t* at_ = ix.const_data_ptr<int32_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, HW)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t o = 0; o < OHW; ++o) {
          const int32_t i = at_[p * OHW + o];
          TORCH_CHECK_INDEX(i >= 0 && i < HW, "index ", i, " is outside a plane of ", HW, " elements");
          dst[p * HW + i] += src[p * OHW + o];
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace pymeta

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("adaptive_max_pool2d(Tensor input, int[] output_size) -> (Tensor, Tensor)");
  m.def("adaptive_max_pool2d_backward(Tensor grad, Tensor indices, int[] input_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("adaptive_max_pool2d", &pymeta::adaptive_max_pool2d_cpu);
  m.impl("adaptive_max_pool2d_backward", &pymeta::adaptive_max_pool2d_backward_cpu);
}
