// Max pooling of one NCHW plane over arbitrary windows, shared by max_pool2d.cpp
// (regular windows) and adaptive_max_pool2d.cpp (adaptive ones).
//
// Same results as ATen, bit for bit: each window is scanned row by row, a value replaces
// the current maximum if it is greater or NaN (so the first maximum wins ties and the
// last NaN wins), and indices are flat positions in the input plane.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace pymeta {

// ATen's update rule: a greater value or a NaN replaces the current maximum.
template <typename scalar_t>
inline bool take(scalar_t v, scalar_t best) {
  return v > best || std::isnan(v);
}

// The windows of a plane: output row oh pools input rows [rows[2 oh], rows[2 oh + 1]),
// output column ow input columns [cols[2 ow], cols[2 ow + 1]); every window non-empty.
struct Windows {
  std::vector<int64_t> rows, cols;
  int64_t out_height() const { return static_cast<int64_t>(rows.size()) / 2; }
  int64_t out_width() const { return static_cast<int64_t>(cols.size()) / 2; }
};

// One plane [H, W] (row stride W) -> [OH, OW] values and indices (int64, or int32 for
// planes of fewer than 2^31 elements).
template <typename scalar_t, typename index_t>
void pool_plane(const scalar_t* in, scalar_t* out, index_t* idx, int64_t W, const Windows& w) {
  const int64_t OH = w.out_height(), OW = w.out_width();
  for (int64_t oh = 0; oh < OH; ++oh) {
    const int64_t row0 = w.rows[2 * oh], row1 = w.rows[2 * oh + 1];
    for (int64_t ow = 0; ow < OW; ++ow) {
      const int64_t col0 = w.cols[2 * ow], col1 = w.cols[2 * ow + 1];
      int64_t where = row0 * W + col0;
      scalar_t best = in[where];
      for (int64_t i = row0; i < row1; ++i) {
        for (int64_t j = (i == row0 ? col0 + 1 : col0); j < col1; ++j) {
          const int64_t at = i * W + j;
          if (take(in[at], best)) {
            best = in[at];
            where = at;
          }
        }
      }
      out[oh * OW + ow] = best;
      idx[oh * OW + ow] = static_cast<index_t>(where);
    }
  }
}

}  // namespace pymeta
