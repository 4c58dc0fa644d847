// ATen binding of the CUDA kernels of pymeta::memory_access (csrc/memory_access.cuh).
// Inputs are made contiguous in their opmath type (half and bfloat16 -> float; a no-op
// for contiguous float/double), the kernels run in float or double, and the outputs are
// rounded to the input dtype once.

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "cuda_binding.h"

#include <tuple>
#include <vector>

#include "memory_access.cuh"

namespace {

using pymeta::current_stream;
namespace kernels = pymeta::memory_access_cuda;

struct Sizes {
  int64_t T, R, W, H;
};

Sizes sizes_of(const at::Tensor& memory, const at::Tensor& keys) {
  TORCH_CHECK_VALUE(memory.dim() == 3 && keys.dim() == 3 && keys.size(0) == memory.size(0) &&
                        keys.size(2) == memory.size(2),
                    "memory must be [T, R, W] and keys [T, H, W], got shapes ", memory.sizes(), " and ",
                    keys.sizes());
  const Sizes s{memory.size(0), memory.size(1), memory.size(2), keys.size(1)};
  TORCH_CHECK_VALUE(s.H >= 1 && s.H <= s.R, "memory_access needs 1 <= H <= R, got H=", s.H, ", R=", s.R);
  return s;
}

// Checks the device and shape of each tensor; returns them contiguous in their opmath type.
std::vector<at::Tensor> prepare(const std::vector<std::tuple<const at::Tensor*, const char*, std::vector<int64_t>>>& args) {
  std::vector<at::Tensor> out;
  for (const auto& [x, name, shape] : args) {
    TORCH_CHECK_VALUE(x->is_cuda(), "the cuda backend runs on CUDA tensors, got ", name, " on ", x->device());
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef(shape), name, " must have shape ", at::IntArrayRef(shape),
                      ", got ", x->sizes());
    out.push_back(x->to(at::toOpMathType(x->scalar_type())).contiguous());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_access_cuda(
    const at::Tensor& memory, const at::Tensor& usage, const at::Tensor& read_weights, const at::Tensor& keys,
    const at::Tensor& adds, const at::Tensor& gates, double gamma, double eps) {
  const Sizes s = sizes_of(memory, keys);
  const c10::DeviceGuard guard(memory.device());
  const auto c = prepare({{&memory, "memory", {s.T, s.R, s.W}},
                          {&usage, "usage", {s.T, s.R}},
                          {&read_weights, "read_weights", {s.T, s.H, s.R}},
                          {&keys, "keys", {s.T, s.H, s.W}},
                          {&adds, "adds", {s.T, s.H, s.W}},
                          {&gates, "gates", {s.T, s.H}}});
  const auto options = c[0].options();
  at::Tensor reads = at::empty({s.T, s.H, s.W}, options), wr_out = at::empty({s.T, s.H, s.R}, options),
             mem_out = at::empty({s.T, s.R, s.W}, options), usage_out = at::empty({s.T, s.R}, options),
             lu = at::empty({s.T, s.H}, options.dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(c[0].scalar_type(), "memory_access_cuda", [&] {
    at::Tensor workspace = at::empty({s.T * kernels::forward_workspace(s.R, s.W, s.H)}, options);
    const cudaError_t err = kernels::launch_forward<scalar_t>(
        c[0].const_data_ptr<scalar_t>(), c[1].const_data_ptr<scalar_t>(), c[2].const_data_ptr<scalar_t>(),
        c[3].const_data_ptr<scalar_t>(), c[4].const_data_ptr<scalar_t>(), c[5].const_data_ptr<scalar_t>(),
        static_cast<scalar_t>(gamma), static_cast<scalar_t>(eps), reads.mutable_data_ptr<scalar_t>(),
        wr_out.mutable_data_ptr<scalar_t>(), mem_out.mutable_data_ptr<scalar_t>(),
        usage_out.mutable_data_ptr<scalar_t>(), lu.mutable_data_ptr<int64_t>(), workspace.mutable_data_ptr<scalar_t>(),
        s.T, s.R, s.W, s.H, current_stream(memory.device()));
    TORCH_CHECK(err == cudaSuccess, "memory_access CUDA kernel failed: ", cudaGetErrorString(err));
  });
  const auto dtype = memory.scalar_type();
  return {reads.to(dtype), wr_out.to(dtype), mem_out.to(dtype), usage_out.to(dtype), lu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> memory_access_backward_cuda(
    const at::Tensor& g_reads, const at::Tensor& g_wr, const at::Tensor& g_mem, const at::Tensor& g_usage,
    const at::Tensor& wr_prev, const at::Tensor& keys, const at::Tensor& adds, const at::Tensor& gates,
    const at::Tensor& wr, const at::Tensor& mem, const at::Tensor& lu_in, double gamma, double eps) {
  const Sizes s = sizes_of(mem, keys);
  const c10::DeviceGuard guard(mem.device());
  const auto c = prepare({{&g_reads, "grad_reads", {s.T, s.H, s.W}},
                          {&g_wr, "grad_read_weights", {s.T, s.H, s.R}},
                          {&g_mem, "grad_memory", {s.T, s.R, s.W}},
                          {&g_usage, "grad_usage", {s.T, s.R}},
                          {&wr_prev, "read_weights", {s.T, s.H, s.R}},
                          {&keys, "keys", {s.T, s.H, s.W}},
                          {&adds, "adds", {s.T, s.H, s.W}},
                          {&gates, "gates", {s.T, s.H}},
                          {&wr, "new_read_weights", {s.T, s.H, s.R}},
                          {&mem, "new_memory", {s.T, s.R, s.W}}});
  TORCH_CHECK_VALUE(lu_in.is_cuda() && lu_in.sizes() == at::IntArrayRef({s.T, s.H}),
                    "least_used must be a CUDA tensor of shape [", s.T, ", ", s.H, "], got ", lu_in.sizes(), " on ",
                    lu_in.device());
  const at::Tensor lu = lu_in.to(at::kLong).contiguous();
  const auto options = c[9].options();
  at::Tensor o_mem = at::empty({s.T, s.R, s.W}, options), o_usage = at::empty({s.T, s.R}, options),
             o_wr_prev = at::empty({s.T, s.H, s.R}, options), o_keys = at::empty({s.T, s.H, s.W}, options),
             o_adds = at::empty({s.T, s.H, s.W}, options), o_gates = at::empty({s.T, s.H}, options);
  AT_DISPATCH_FLOATING_TYPES(c[9].scalar_type(), "memory_access_backward_cuda", [&] {
    at::Tensor workspace = at::empty({s.T * kernels::backward_workspace(s.R, s.W, s.H)}, options);
    const kernels::Grads<scalar_t> grads{
        c[0].const_data_ptr<scalar_t>(),     c[1].const_data_ptr<scalar_t>(),      c[2].const_data_ptr<scalar_t>(),
        c[3].const_data_ptr<scalar_t>(),     o_mem.mutable_data_ptr<scalar_t>(),   o_usage.mutable_data_ptr<scalar_t>(),
        o_wr_prev.mutable_data_ptr<scalar_t>(), o_keys.mutable_data_ptr<scalar_t>(), o_adds.mutable_data_ptr<scalar_t>(),
        o_gates.mutable_data_ptr<scalar_t>()};
    const cudaError_t err = kernels::launch_backward<scalar_t>(
        grads, c[4].const_data_ptr<scalar_t>(), c[5].const_data_ptr<scalar_t>(), c[6].const_data_ptr<scalar_t>(),
        c[7].const_data_ptr<scalar_t>(), c[8].const_data_ptr<scalar_t>(), c[9].const_data_ptr<scalar_t>(),
        lu.const_data_ptr<int64_t>(), static_cast<scalar_t>(gamma), static_cast<scalar_t>(eps),
        workspace.mutable_data_ptr<scalar_t>(), s.T, s.R, s.W, s.H, current_stream(mem.device()));
    TORCH_CHECK(err == cudaSuccess, "memory_access_backward CUDA kernel failed: ", cudaGetErrorString(err));
  });
  const auto dtype = mem.scalar_type();
  return {o_mem.to(dtype), o_usage.to(dtype), o_wr_prev.to(dtype), o_keys.to(dtype), o_adds.to(dtype),
          o_gates.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cuda, m) {
  m.def("memory_access(Tensor memory, Tensor usage, Tensor read_weights, Tensor keys, Tensor adds, Tensor gates, "
        "float gamma, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("memory_access_backward(Tensor grad_reads, Tensor grad_read_weights, Tensor grad_memory, Tensor grad_usage, "
        "Tensor read_weights, Tensor keys, Tensor adds, Tensor gates, Tensor new_read_weights, Tensor new_memory, "
        "Tensor least_used, float gamma, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cuda, CUDA, m) {
  m.impl("memory_access", &memory_access_cuda);
  m.impl("memory_access_backward", &memory_access_backward_cuda);
}
