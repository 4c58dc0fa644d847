// Operand layout of pymeta::inner_sgd, shared by its ATen bindings (inner_sgd.cpp for
// CPU, inner_sgd.cu for CUDA) so both read the list the same way and check it alike.
//
// Entry k is viewed as a [rows, cols] matrix: rows = size(0) (the task dim; 1 for a 0-dim
// tensor), cols = the product of the other sizes. Element (t, j) of an operand lives at
//   data[t * row_stride + j * col_stride]
// params / grads / grad_outs keep their own row stride (0 for MAML's `p.expand(T, ...)`,
// so expanded fast weights are never copied) and have dense trailing dims (col stride 1);
// lr[k] is contiguous and broadcasts per task (row stride) and/or per element (col stride).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace pymeta {
namespace inner_sgd {

struct Operands {
  // p is a grad_out in the backward (same shape, dtype and layout rules); lr is undefined
  // when the op has no lr tensors (the update then uses `scale` alone).
  at::Tensor p, g, lr;
  int64_t rows = 0, cols = 0;
  int64_t p_rs = 0, g_rs = 0, lr_rs = 0, lr_cs = 0;
};

// True when every dim after the first is laid out densely (size-1 dims do not count).
inline bool dense_trailing(const at::Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 1; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

// x itself when its trailing dims are dense (any row stride), else a dense copy.
inline at::Tensor as_rows(const at::Tensor& x, int64_t& row_stride) {
  at::Tensor y = dense_trailing(x) ? x : x.contiguous();
  row_stride = y.dim() == 0 ? 0 : y.stride(0);
  return y;
}

// The Python op checks the inputs with clear messages first; these checks only keep a
// direct caller of the library op from reading out of bounds.
inline Operands operands(const at::Tensor& p, const at::Tensor& g, const at::Tensor* lr, int64_t k,
                         c10::DeviceType device) {
  TORCH_CHECK_VALUE(p.device().type() == device && g.device() == p.device() && (!lr || lr->device() == p.device()),
                    "inner_sgd: the tensors of entry ", k, " must all be on one ", device, " device");
  TORCH_CHECK_VALUE(g.sizes() == p.sizes(), "inner_sgd: grads[", k, "] has shape ", g.sizes(), " but params[", k,
                    "] has shape ", p.sizes());
  TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type() && at::isFloatingType(p.scalar_type()), "inner_sgd: params[",
                   k, "] and grads[", k, "] must share a floating dtype, got ", p.scalar_type(), " and ",
                   g.scalar_type());
  Operands e;
  e.rows = p.dim() == 0 ? 1 : p.size(0);
  e.cols = e.rows == 0 ? 0 : p.numel() / e.rows;
  e.p = as_rows(p, e.p_rs);
  e.g = as_rows(g, e.g_rs);
  if (lr != nullptr) {
    const auto acc = at::toOpMathType(p.scalar_type());
    TORCH_CHECK_TYPE(lr->scalar_type() == acc, "inner_sgd: lr[", k, "] must have dtype ", acc, ", got ",
                     lr->scalar_type());
    const bool per_task = lr->dim() == p.dim() && p.dim() > 0 && lr->size(0) != 1;
    const int64_t task_part = per_task ? lr->size(0) : 1;
    const int64_t per_task_numel = lr->numel() / task_part;
    TORCH_CHECK_VALUE(lr->dim() <= p.dim() && (!per_task || task_part == e.rows) &&
                          (per_task_numel == 1 || per_task_numel == e.cols),
                      "inner_sgd: lr[", k, "] of shape ", lr->sizes(), " must broadcast to params[", k,
                      "] of shape ", p.sizes(), " per task and/or per element");
    e.lr = lr->contiguous();
    e.lr_cs = per_task_numel > 1 ? 1 : 0;
    e.lr_rs = per_task ? per_task_numel : 0;
  }
  return e;
}

inline std::vector<Operands> operands(at::TensorList params, at::TensorList grads, at::TensorList lr,
                                      c10::DeviceType device) {
  TORCH_CHECK_VALUE(grads.size() == params.size(), "inner_sgd: got ", params.size(), " params but ", grads.size(),
                    " grads");
  TORCH_CHECK_VALUE(lr.empty() || lr.size() == params.size(), "inner_sgd: got ", params.size(), " params but ",
                    lr.size(), " lr tensors");
  std::vector<Operands> entries;
  entries.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    entries.push_back(operands(params[k], grads[k], lr.empty() ? nullptr : &lr[k], static_cast<int64_t>(k), device));
  }
  return entries;
}

}  // namespace inner_sgd
}  // namespace pymeta
