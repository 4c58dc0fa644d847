// Host-side launch arithmetic of the CUDA kernels of pymeta::inner_sgd (csrc/inner_sgd.cuh):
// the entry tables the kernels read and the grids they run on, built by csrc/inner_sgd.cu.
// Plain C++17 (no CUDA, no torch), so CPU-only CI checks it (tests/test_cuda_launch.py);
// the static_asserts also run in both nvcc passes (host and device) of tests/test_compile_kernels.py.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda_launch.h"

namespace pymeta {
namespace inner_sgd_cuda {

constexpr int kForwardThreads = 256;
constexpr int kForwardTile = 4 * kForwardThreads;
constexpr int kBackwardThreads = 256;
constexpr int kReduceThreads = 128;

static_assert(kForwardTile % kForwardThreads == 0, "forward_kernel: every thread takes the same count of a tile");
static_assert(kBackwardThreads % kWarpSize == 0 && kBackwardThreads / kWarpSize <= kWarpSize,
              "block_sum: whole warps, and thread 0 adds one partial sum per warp");
static_assert(kForwardThreads <= kMaxThreads && kBackwardThreads <= kMaxThreads && kReduceThreads <= kMaxThreads,
              "at most 1024 threads per block");

// Entry k of the list as a [rows, cols] matrix with row / col strides (see csrc/inner_sgd.h);
// p_rs is the row stride of params in the forward, of grad_outs in the backward.
struct Shape {
  int64_t rows, cols, p_rs, g_rs, lr_rs, lr_cs;
};

// One tensor of the list. Pointers are untyped so a table of them is one plain array.
struct ForwardEntry {
  const void* p;
  const void* g;
  void* out;
  const void* lr;  // null: the rate is `scale` alone
  Shape shape;
  int64_t first_tile;
};

struct BackwardEntry {
  const void* go;
  const void* g;   // read only for the lr gradient
  const void* lr;  // null: no lr tensors
  void* grad_g;    // null: not needed
  void* grad_lr;   // null: not needed
  Shape shape;
  int64_t partial;  // first per-(strip, row) partial sum, or -1 when lr is not per task / per layer
  int64_t first_tile;
};

// A per-task ([T, 1, ...]) or per-layer ([]) lr gradient to add up from the partial sums.
struct ReduceEntry {
  void* grad_lr;
  int64_t partial, rows, tiles, per_task;
};

// The launchers copy the tables to the device byte for byte and the kernels read them as
// arrays of these structs: trivially copyable, 8-byte fields, no padding, one layout in
// both nvcc passes (a pointer is 8 bytes on every target these kernels build for).
template <typename Entry>
constexpr bool plain_table(int fields) {
  return std::is_trivially_copyable_v<Entry> && std::is_standard_layout_v<Entry> && alignof(Entry) == 8 &&
         sizeof(Entry) == 8 * static_cast<size_t>(fields);
}
static_assert(sizeof(void*) == 8, "64-bit targets only");
static_assert(plain_table<Shape>(6) && plain_table<ForwardEntry>(11) && plain_table<BackwardEntry>(13) &&
                  plain_table<ReduceEntry>(5),
              "entry tables must be packed arrays of 8-byte fields");

// forward_kernel: block b updates tile b - first_tile of the entry with the largest
// first_tile <= b (tiles of kForwardTile consecutive elements of rows x cols).
struct ForwardPlan {
  std::vector<ForwardEntry> table;  // in first_tile order
  int64_t tiles = 0;

  void add(const void* p, const void* g, void* out, const void* lr, const Shape& s) {
    table.push_back(ForwardEntry{p, g, out, lr, s, tiles});
    tiles += ceil_div(s.rows * s.cols, kForwardTile);
  }

  Launch launch() const { return Launch{tiles, 1, kForwardThreads}; }
};

// backward_kernel: block b owns strip b - first_tile (kBackwardThreads columns over all rows)
// of its entry; a per-task / per-layer lr gradient leaves partial sums at
// partial + strip * rows + row, which reduce_kernel (one block per ReduceEntry) adds up.
struct BackwardPlan {
  std::vector<BackwardEntry> table;  // in first_tile order
  std::vector<ReduceEntry> reduce;
  int64_t tiles = 0, partials = 0;

  // g and grad_lr: null unless the lr gradient is needed; grad_g: null unless needed.
  void add(const void* go, const void* g, const void* lr, void* grad_g, void* grad_lr, const Shape& s) {
    const int64_t strips = ceil_div(s.cols, kBackwardThreads);
    const bool reduced = grad_lr != nullptr && s.lr_cs == 0;  // per task or per layer
    table.push_back(BackwardEntry{go, g, lr, grad_g, grad_lr, s, reduced ? partials : -1, tiles});
    if (reduced) {
      reduce.push_back(ReduceEntry{grad_lr, partials, s.rows, strips, s.lr_rs != 0 ? 1 : 0});
      partials += strips * s.rows;
    }
    tiles += strips;
  }

  Launch launch() const { return Launch{tiles, 1, kBackwardThreads}; }
  Launch reduce_launch() const { return Launch{static_cast<int64_t>(reduce.size()), 1, kReduceThreads}; }
};

}  // namespace inner_sgd_cuda
}  // namespace pymeta
