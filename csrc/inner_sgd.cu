// ATen binding of the CUDA kernels of pymeta::inner_sgd (csrc/inner_sgd.cuh): groups the
// list by dtype, packs one table of entries per group (one host-to-device copy; the
// arithmetic is in csrc/inner_sgd_launch.h) and launches the kernels once per group.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "cuda_binding.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>
#include <type_traits>
#include <vector>

#include "inner_sgd.cuh"
#include "inner_sgd.h"

namespace {

using pymeta::inner_sgd::Operands;
namespace kernels = pymeta::inner_sgd_cuda;

using pymeta::cuda_type_t;
using pymeta::current_stream;

// Copies `items` to a device buffer (kept alive by the returned tensor). The source is
// pageable host memory, so the copy is staged before `to` returns: no stream sync needed.
template <typename T>
at::Tensor upload(const std::vector<T>& items, const c10::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(items.size() * sizeof(T))}, at::kByte);
  std::memcpy(host.mutable_data_ptr(), items.data(), items.size() * sizeof(T));
  return host.to(device, /*non_blocking=*/true);
}

// Indices of the non-empty entries, grouped by dtype: one launch per group.
std::map<at::ScalarType, std::vector<size_t>> by_dtype(const std::vector<Operands>& entries) {
  std::map<at::ScalarType, std::vector<size_t>> groups;
  for (size_t k = 0; k < entries.size(); ++k) {
    if (entries[k].rows * entries[k].cols > 0) groups[entries[k].p.scalar_type()].push_back(k);
  }
  return groups;
}

// Entry e's [rows, cols] view and strides, as the kernels' tables hold them.
kernels::Shape shape(const Operands& e) { return {e.rows, e.cols, e.p_rs, e.g_rs, e.lr_rs, e.lr_cs}; }

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " CUDA kernel failed: ", cudaGetErrorString(err));
}

std::vector<at::Tensor> inner_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList lr, double scale) {
  const auto entries = pymeta::inner_sgd::operands(params, grads, lr, c10::DeviceType::CUDA);
  std::vector<at::Tensor> outs;
  for (const auto& p : params) outs.push_back(at::empty(p.sizes(), p.options()));
  if (entries.empty()) return outs;
  const c10::Device device = params[0].device();
  const c10::DeviceGuard guard(device);
  for (const auto& group : by_dtype(entries)) {
    kernels::ForwardPlan plan;
    for (size_t k : group.second) {
      const Operands& e = entries[k];
      plan.add(e.p.const_data_ptr(), e.g.const_data_ptr(), outs[k].mutable_data_ptr(),
               e.lr.defined() ? e.lr.const_data_ptr() : nullptr, shape(e));
    }
    const at::Tensor table = upload(plan.table, device);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "inner_sgd_cuda", [&] {
      check(kernels::launch_forward<cuda_type_t<scalar_t>, at::opmath_type<scalar_t>>(
                static_cast<const kernels::ForwardEntry*>(table.const_data_ptr()),
                static_cast<int>(plan.table.size()), plan.launch(), scale, current_stream(device)),
            "inner_sgd");
    });
  }
  return outs;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> inner_sgd_backward_cuda(
    at::TensorList grad_outs, at::TensorList grads, at::TensorList lr, double scale, bool need_grads, bool need_lr) {
  need_lr = need_lr && !lr.empty();
  TORCH_CHECK_VALUE(!need_lr || !grads.empty(), "inner_sgd_backward: the lr gradient needs the grads");
  // Without lr gradients the grads are never read: grad_outs stand in for them.
  const auto entries =
      pymeta::inner_sgd::operands(grad_outs, grads.empty() ? grad_outs : grads, lr, c10::DeviceType::CUDA);
  std::vector<at::Tensor> grad_g, grad_lr;
  for (size_t k = 0; k < entries.size(); ++k) {
    if (need_grads) grad_g.push_back(at::empty(grad_outs[k].sizes(), grad_outs[k].options()));
    // Zero-size tensors launch nothing, so their (possibly non-empty) lr gradient is zero.
    if (need_lr) {
      grad_lr.push_back(entries[k].rows * entries[k].cols == 0 ? at::zeros_like(lr[k])
                                                               : at::empty(lr[k].sizes(), lr[k].options()));
    }
  }
  if (entries.empty() || (!need_grads && !need_lr)) return {std::move(grad_g), std::move(grad_lr)};
  const c10::Device device = grad_outs[0].device();
  const c10::DeviceGuard guard(device);
  for (const auto& group : by_dtype(entries)) {
    kernels::BackwardPlan plan;
    for (size_t k : group.second) {
      const Operands& e = entries[k];
      plan.add(e.p.const_data_ptr(), need_lr ? e.g.const_data_ptr() : nullptr,
               e.lr.defined() ? e.lr.const_data_ptr() : nullptr, need_grads ? grad_g[k].mutable_data_ptr() : nullptr,
               need_lr ? grad_lr[k].mutable_data_ptr() : nullptr, shape(e));
    }
    const at::Tensor table = upload(plan.table, device);
    const at::Tensor reduce = upload(plan.reduce, device);
    at::Tensor partial = at::empty({std::max<int64_t>(plan.partials, 1)}, grad_outs[0].options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "inner_sgd_backward_cuda", [&] {
      check(kernels::launch_backward<cuda_type_t<scalar_t>, at::opmath_type<scalar_t>>(
                static_cast<const kernels::BackwardEntry*>(table.const_data_ptr()),
                static_cast<int>(plan.table.size()), plan.launch(),
                static_cast<const kernels::ReduceEntry*>(reduce.const_data_ptr()), plan.reduce_launch(),
                partial.mutable_data_ptr<double>(), scale, current_stream(device)),
            "inner_sgd_backward");
    });
  }
  return {std::move(grad_g), std::move(grad_lr)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cuda, m) {
  m.def("inner_sgd(Tensor[] params, Tensor[] grads, Tensor[] lr, float scale) -> Tensor[]");
  m.def(
      "inner_sgd_backward(Tensor[] grad_outs, Tensor[] grads, Tensor[] lr, float scale, bool need_grads, "
      "bool need_lr) -> (Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(pymeta_cuda, CUDA, m) {
  m.impl("inner_sgd", &inner_sgd_cuda);
  m.impl("inner_sgd_backward", &inner_sgd_backward_cuda);
}
