// ATen binding of the CUDA kernels of pymeta::prototypes (csrc/prototypes.cuh).
// Label values are checked in Python before the forward launches (a device-side check
// could not raise a ValueError naming the task and class).

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "cuda_binding.h"

#include <type_traits>

#include "prototypes.cuh"

namespace {

using pymeta::cuda_type_t;
using pymeta::current_stream;

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda(), "the cuda backend runs on CUDA tensors, got ", name, " on ", x.device());
}

at::Tensor prototypes_cuda(const at::Tensor& support_in, const at::Tensor& labels_in, int64_t n_way) {
  check_cuda(support_in, "support");
  check_cuda(labels_in, "labels");
  TORCH_CHECK_VALUE(support_in.dim() == 3 && labels_in.dim() == 2 && labels_in.sizes() == support_in.sizes().slice(0, 2),
                    "support must be [T, S, D] and labels [T, S], got shapes ", support_in.sizes(), " and ",
                    labels_in.sizes());
  TORCH_CHECK_VALUE(n_way >= 1, "n_way must be >= 1, got ", n_way);
  const c10::DeviceGuard guard(support_in.device());
  const at::Tensor support = support_in.contiguous(), labels = labels_in.to(at::kLong).contiguous();
  const int64_t T = support.size(0), S = support.size(1), D = support.size(2);
  at::Tensor out = at::empty({T, n_way, D}, support.options());
  at::Tensor counts = at::empty({T, n_way}, support.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, support.scalar_type(), "prototypes_cuda", [&] {
    using cuda_t = cuda_type_t<scalar_t>;
    const cudaError_t err = pymeta::prototypes_cuda::launch_forward<cuda_t, at::opmath_type<scalar_t>>(
        reinterpret_cast<const cuda_t*>(support.const_data_ptr<scalar_t>()), labels.const_data_ptr<int64_t>(),
        reinterpret_cast<cuda_t*>(out.mutable_data_ptr<scalar_t>()), counts.mutable_data_ptr<int>(), T, S, n_way, D,
        current_stream(out.device()));
    TORCH_CHECK(err == cudaSuccess, "prototypes CUDA kernel failed: ", cudaGetErrorString(err));
  });
  return out;
}

at::Tensor prototypes_backward_cuda(const at::Tensor& grad_in, const at::Tensor& labels_in, int64_t n_way) {
  check_cuda(grad_in, "grad");
  check_cuda(labels_in, "labels");
  TORCH_CHECK_VALUE(grad_in.dim() == 3 && grad_in.size(1) == n_way && labels_in.dim() == 2 &&
                        labels_in.size(0) == grad_in.size(0),
                    "grad must be [T, n_way, D] and labels [T, S], got shapes ", grad_in.sizes(), " and ",
                    labels_in.sizes());
  const c10::DeviceGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), labels = labels_in.to(at::kLong).contiguous();
  const int64_t T = labels.size(0), S = labels.size(1), D = grad.size(2);
  at::Tensor out = at::empty({T, S, D}, grad.options());
  at::Tensor counts = at::empty({T, n_way}, grad.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "prototypes_backward_cuda", [&] {
    using cuda_t = cuda_type_t<scalar_t>;
    const cudaError_t err = pymeta::prototypes_cuda::launch_backward<cuda_t, at::opmath_type<scalar_t>>(
        reinterpret_cast<const cuda_t*>(grad.const_data_ptr<scalar_t>()), labels.const_data_ptr<int64_t>(),
        reinterpret_cast<cuda_t*>(out.mutable_data_ptr<scalar_t>()), counts.mutable_data_ptr<int>(), T, S, n_way, D,
        current_stream(out.device()));
    TORCH_CHECK(err == cudaSuccess, "prototypes_backward CUDA kernel failed: ", cudaGetErrorString(err));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cuda, m) {
  m.def("prototypes(Tensor support, Tensor labels, int n_way) -> Tensor");
  m.def("prototypes_backward(Tensor grad, Tensor labels, int n_way) -> Tensor");
}

TORCH_LIBRARY_IMPL(pymeta_cuda, CUDA, m) {
  m.impl("prototypes", &prototypes_cuda);
  m.impl("prototypes_backward", &prototypes_backward_cuda);
}
