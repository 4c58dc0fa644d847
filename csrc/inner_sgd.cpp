// Fused inner-loop SGD on CPU: out[k] = params[k] - scale * lr[k] * grads[k] for every
// tensor of a list in ONE parallel region, and its fused backward. The operand layout
// (rows = task dim, row/col strides, stride-0 expanded params) is in inner_sgd.h.
//
// Work is split into tiles of about kTileElements, each a rectangle of rows [t0, t1) x
// columns [j0, j1) of one entry: whole rows when rows are short, else pieces of one row,
// so every tile streams through memory linearly. The one exception is the backward of an
// lr shared by every task (Meta-SGD): its gradient sums over rows, so those tiles are
// column strips over all rows and each owns its columns' sums (no atomics, no races).
// Everything is deterministic: partial sums are combined in tile order.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "inner_sgd.h"
#include "multiversion.h"

namespace pymeta {
namespace {

using inner_sgd::Operands;

// Elements per tile: big enough to amortise the per-tile dispatch, small enough that a
// conv4 fast-weight set (3.6M elements at T=32) splits into >100 tiles for load balance.
constexpr int64_t kTileElements = 1 << 15;
// Below this many elements in total, threads cost more than they save.
constexpr int64_t kParallelElements = 1 << 16;

// The tile functions have an AVX2 + FMA clone (multiversion.h): measured 1.6x faster on
// cache-resident data.

struct Tile {
  int64_t entry, t0, t1, j0, j1;
  // Backward of a per-task / per-layer lr: slot of row t0's partial sum (rows t0.. follow),
  // one slot per (row, column piece) of the entry; -1 when the tile needs none.
  int64_t partial;
};

// Tiles of every non-empty entry. `strips(e)`: column strips over all rows for entry e;
// `partials_for(e)`: e needs per-row partial sums (returned count of slots: `partials`).
template <typename Strips, typename Partials>
std::vector<Tile> make_tiles(const std::vector<Operands>& entries, Strips strips, Partials partials_for,
                             int64_t& partials, int64_t& elements) {
  std::vector<Tile> tiles;
  partials = 0;
  elements = 0;
  for (size_t k = 0; k < entries.size(); ++k) {
    const Operands& e = entries[k];
    if (e.rows == 0 || e.cols == 0) continue;
    elements += e.rows * e.cols;
    int64_t width, height;
    if (strips(e)) {
      width = std::max<int64_t>(64, kTileElements / e.rows);
      height = e.rows;
    } else if (e.cols >= kTileElements) {
      width = kTileElements;
      height = 1;
    } else {
      width = e.cols;
      height = std::max<int64_t>(1, kTileElements / e.cols);
    }
    const bool partial = partials_for(e);
    for (int64_t j0 = 0; j0 < e.cols; j0 += width) {
      for (int64_t t0 = 0; t0 < e.rows; t0 += height) {
        const int64_t t1 = std::min(e.rows, t0 + height);
        tiles.push_back({static_cast<int64_t>(k), t0, t1, j0, std::min(e.cols, j0 + width), partial ? partials : -1});
        if (partial) partials += t1 - t0;
      }
    }
  }
  return tiles;
}

template <typename F>
void for_each_tile(const std::vector<Tile>& tiles, int64_t elements, const F& body) {
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(tiles[i]);
  };
  if (elements < kParallelElements) {
    run(0, static_cast<int64_t>(tiles.size()));
  } else {
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, run);
  }
}

// out = p + c * g with a constant c (float lr, or a per-task / per-layer lr). Plain loops
// over restrict pointers: the compiler vectorises them.
template <typename scalar_t, typename acc_t>
void axpy(scalar_t* __restrict__ out, const scalar_t* __restrict__ p, const scalar_t* __restrict__ g, acc_t c,
          int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = static_cast<scalar_t>(static_cast<acc_t>(p[j]) + c * static_cast<acc_t>(g[j]));
  }
}

// out = p + (c * lr) * g with per-element lrs (Meta-SGD); same rounding order as addcmul.
template <typename scalar_t, typename acc_t>
void axpy_lr(scalar_t* __restrict__ out, const scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
             const acc_t* __restrict__ lr, acc_t c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = static_cast<scalar_t>(static_cast<acc_t>(p[j]) + c * lr[j] * static_cast<acc_t>(g[j]));
  }
}

template <typename scalar_t>
PYMETA_MULTIVERSION void forward_tile(const Operands& e, const Tile& tile, at::Tensor& out, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* p = e.p.const_data_ptr<scalar_t>();
  const scalar_t* g = e.g.const_data_ptr<scalar_t>();
  const acc_t* lr = e.lr.defined() ? e.lr.const_data_ptr<acc_t>() : nullptr;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const acc_t neg = -static_cast<acc_t>(scale);
  const int64_t j0 = tile.j0, n = tile.j1 - tile.j0;
  for (int64_t t = tile.t0; t < tile.t1; ++t) {
    scalar_t* orow = o + t * e.cols + j0;
    const scalar_t* prow = p + t * e.p_rs + j0;
    const scalar_t* grow = g + t * e.g_rs + j0;
    if (lr != nullptr && e.lr_cs != 0) {
      axpy_lr(orow, prow, grow, lr + t * e.lr_rs + j0, neg, n);
    } else {
      axpy(orow, prow, grow, lr != nullptr ? neg * lr[t * e.lr_rs] : neg, n);
    }
  }
}

std::vector<at::Tensor> inner_sgd_forward(at::TensorList params, at::TensorList grads, at::TensorList lr,
                                          double scale) {
  const auto entries = inner_sgd::operands(params, grads, lr, c10::DeviceType::CPU);
  std::vector<at::Tensor> outs;
  outs.reserve(entries.size());
  for (size_t k = 0; k < entries.size(); ++k) {
    outs.push_back(at::empty(params[k].sizes(), params[k].options()));
  }
  int64_t partials = 0, elements = 0;
  auto never = [](const Operands&) { return false; };
  const auto tiles = make_tiles(entries, never, never, partials, elements);
  for_each_tile(tiles, elements, [&](const Tile& tile) {
    const Operands& e = entries[tile.entry];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.p.scalar_type(), "inner_sgd_forward", [&] {
      forward_tile<scalar_t>(e, tile, outs[tile.entry], scale);
    });
  });
  return outs;
}

// Backward of one tile. grad_grads = -scale * lr * grad_out (param dtype);
// grad_lr = -scale * sum(grads * grad_out) over the dims lr broadcasts along (lr dtype).
// Sums of products are formed and added in double: never less accurate than PyTorch's
// own (cascade) sums, and cheap next to the memory traffic.
template <typename scalar_t>
PYMETA_MULTIVERSION void backward_tile(const Operands& e, const Tile& tile, double scale, at::Tensor* grad_g, at::Tensor* grad_lr,
                   double* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go = e.p.const_data_ptr<scalar_t>();  // Operands::p holds grad_out in the backward
  const acc_t* lr = e.lr.defined() ? e.lr.const_data_ptr<acc_t>() : nullptr;
  const acc_t neg = -static_cast<acc_t>(scale);
  const int64_t j0 = tile.j0, n = tile.j1 - tile.j0;
  if (grad_g != nullptr) {
    scalar_t* out = grad_g->mutable_data_ptr<scalar_t>();
    for (int64_t t = tile.t0; t < tile.t1; ++t) {
      scalar_t* __restrict__ orow = out + t * e.cols + j0;
      const scalar_t* __restrict__ gorow = go + t * e.p_rs + j0;
      if (lr != nullptr && e.lr_cs != 0) {
        const acc_t* __restrict__ lrow = lr + t * e.lr_rs + j0;
        for (int64_t j = 0; j < n; ++j) orow[j] = static_cast<scalar_t>(neg * lrow[j] * static_cast<acc_t>(gorow[j]));
      } else {
        const acc_t c = lr != nullptr ? neg * lr[t * e.lr_rs] : neg;
        for (int64_t j = 0; j < n; ++j) orow[j] = static_cast<scalar_t>(c * static_cast<acc_t>(gorow[j]));
      }
    }
  }
  if (grad_lr == nullptr) return;
  const scalar_t* g = e.g.const_data_ptr<scalar_t>();
  acc_t* out = grad_lr->mutable_data_ptr<acc_t>();
  if (e.lr_cs != 0 && e.lr_rs != 0) {  // per task and element: no reduction
    for (int64_t t = tile.t0; t < tile.t1; ++t) {
      const scalar_t* __restrict__ gorow = go + t * e.p_rs + j0;
      const scalar_t* __restrict__ grow = g + t * e.g_rs + j0;
      acc_t* __restrict__ orow = out + t * e.lr_rs + j0;
      for (int64_t j = 0; j < n; ++j) orow[j] = neg * (static_cast<acc_t>(gorow[j]) * static_cast<acc_t>(grow[j]));
    }
    return;
  }
  if (e.lr_cs != 0) {  // per element, shared by every task: this strip holds all rows
    std::vector<double> col(n, 0.0);
    for (int64_t t = tile.t0; t < tile.t1; ++t) {
      const scalar_t* __restrict__ gorow = go + t * e.p_rs + j0;
      const scalar_t* __restrict__ grow = g + t * e.g_rs + j0;
      for (int64_t j = 0; j < n; ++j) col[j] += static_cast<double>(gorow[j]) * static_cast<double>(grow[j]);
    }
    for (int64_t j = 0; j < n; ++j) out[j0 + j] = static_cast<acc_t>(-scale * col[j]);
    return;
  }
  // Per task or per layer: one partial sum per row of this tile, combined afterwards.
  for (int64_t t = tile.t0; t < tile.t1; ++t) {
    const scalar_t* __restrict__ gorow = go + t * e.p_rs + j0;
    const scalar_t* __restrict__ grow = g + t * e.g_rs + j0;
    // Independent accumulators let the compiler vectorise the reduction.
    double lanes[8] = {};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(gorow[j + l]) * static_cast<double>(grow[j + l]);
    }
    for (; j < n; ++j) lanes[0] += static_cast<double>(gorow[j]) * static_cast<double>(grow[j]);
    double sum = 0;
    for (double lane : lanes) sum += lane;
    partials[tile.partial + t - tile.t0] = sum;
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> inner_sgd_backward(
    at::TensorList grad_outs, at::TensorList grads, at::TensorList lr, double scale, bool need_grads, bool need_lr) {
  need_lr = need_lr && !lr.empty();
  TORCH_CHECK_VALUE(!need_lr || !grads.empty(), "inner_sgd_backward: the lr gradient needs the grads");
  // grad_out takes the params' place: it has their shape and dtype, and any row stride. Without
  // lr gradients the grads are never read (the caller may not even have kept them).
  const auto entries =
      inner_sgd::operands(grad_outs, grads.empty() ? grad_outs : grads, lr, c10::DeviceType::CPU);
  std::vector<at::Tensor> grad_g, grad_lr;
  for (size_t k = 0; k < entries.size(); ++k) {
    if (need_grads) grad_g.push_back(at::empty(grad_outs[k].sizes(), grad_outs[k].options()));
    // Zero-size tensors have no tiles; their (possibly non-empty) lr gradient is zero.
    if (need_lr) {
      grad_lr.push_back(entries[k].rows * entries[k].cols == 0 ? at::zeros_like(lr[k])
                                                               : at::empty(lr[k].sizes(), lr[k].options()));
    }
  }
  int64_t partials = 0, elements = 0;
  const auto tiles = make_tiles(
      entries, [&](const Operands& e) { return need_lr && e.lr_cs != 0 && e.lr_rs == 0; },
      [&](const Operands& e) { return need_lr && e.lr_cs == 0; }, partials, elements);
  std::vector<double> partial(partials);
  for_each_tile(tiles, elements, [&](const Tile& tile) {
    const Operands& e = entries[tile.entry];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.p.scalar_type(), "inner_sgd_backward", [&] {
      backward_tile<scalar_t>(e, tile, scale, need_grads ? &grad_g[tile.entry] : nullptr,
                              need_lr ? &grad_lr[tile.entry] : nullptr, partial.data());
    });
  });
  // Combine the per-row partial sums in tile order (deterministic): per task -> [T], per layer -> [].
  std::vector<std::vector<double>> sums(entries.size());
  for (const Tile& tile : tiles) {
    if (tile.partial < 0) continue;
    const Operands& e = entries[tile.entry];
    auto& s = sums[tile.entry];
    s.resize(e.lr_rs != 0 ? e.rows : 1, 0.0);
    for (int64_t t = tile.t0; t < tile.t1; ++t) s[e.lr_rs != 0 ? t : 0] += partial[tile.partial + t - tile.t0];
  }
  for (size_t k = 0; k < entries.size(); ++k) {
    if (sums[k].empty()) continue;
    AT_DISPATCH_FLOATING_TYPES(grad_lr[k].scalar_type(), "inner_sgd_backward_combine", [&] {
      scalar_t* out = grad_lr[k].mutable_data_ptr<scalar_t>();
      for (size_t i = 0; i < sums[k].size(); ++i) out[i] = static_cast<scalar_t>(-scale * sums[k][i]);
    });
  }
  return {std::move(grad_g), std::move(grad_lr)};
}

}  // namespace
}  // namespace pymeta

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("inner_sgd(Tensor[] params, Tensor[] grads, Tensor[] lr, float scale) -> Tensor[]");
  m.def(
      "inner_sgd_backward(Tensor[] grad_outs, Tensor[] grads, Tensor[] lr, float scale, bool need_grads, "
      "bool need_lr) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("inner_sgd", &pymeta::inner_sgd_forward);
  m.impl("inner_sgd_backward", &pymeta::inner_sgd_backward);
}
