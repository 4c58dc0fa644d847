// ATen binding of the CUDA kernels of pymeta::proto_logits (csrc/proto_logits.cuh).

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "cuda_binding.h"

#include <type_traits>

#include "proto_logits.cuh"

namespace {

using pymeta::cuda_type_t;
using pymeta::current_stream;

void check_inputs(const at::Tensor& query, const at::Tensor& protos, int64_t metric) {
  TORCH_CHECK_VALUE(metric >= 0 && metric <= 2,
                    "metric index must be 0 (sqeuclidean), 1 (euclidean) or 2 (cosine), got ", metric);
  TORCH_CHECK_VALUE(query.is_cuda() && protos.is_cuda(), "the cuda backend runs on CUDA tensors, got query on ",
                    query.device(), " and protos on ", protos.device());
  TORCH_CHECK_TYPE(query.is_floating_point() && protos.scalar_type() == query.scalar_type(),
                   "query and protos must share one floating dtype, got ", query.scalar_type(), " and ",
                   protos.scalar_type());
  TORCH_CHECK_VALUE(query.dim() == 3 && protos.dim() == 3 && query.size(0) == protos.size(0) &&
                        query.size(2) == protos.size(2),
                    "query must be [T, Q, D] and protos [T, N, D], got shapes ", query.sizes(), " and ",
                    protos.sizes());
}

at::Tensor proto_logits_cuda(const at::Tensor& query_in, const at::Tensor& protos_in, int64_t metric, double eps) {
  check_inputs(query_in, protos_in, metric);
  const c10::DeviceGuard guard(query_in.device());
  const at::Tensor query = query_in.contiguous(), protos = protos_in.contiguous();
  const int64_t T = query.size(0), Q = query.size(1), N = protos.size(1), D = query.size(2);
  at::Tensor out = at::empty({T, Q, N}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "proto_logits_cuda", [&] {
    using cuda_t = cuda_type_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    const cudaError_t err = pymeta::proto_logits_cuda::launch_forward<cuda_t, acc_t>(
        reinterpret_cast<const cuda_t*>(query.const_data_ptr<scalar_t>()),
        reinterpret_cast<const cuda_t*>(protos.const_data_ptr<scalar_t>()),
        reinterpret_cast<cuda_t*>(out.mutable_data_ptr<scalar_t>()), T, Q, N, D, static_cast<int>(metric),
        static_cast<acc_t>(eps), current_stream(query.device()));
    TORCH_CHECK(err == cudaSuccess, "proto_logits CUDA kernel failed: ", cudaGetErrorString(err));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> proto_logits_backward_cuda(const at::Tensor& grad_in, const at::Tensor& query_in,
                                                              const at::Tensor& protos_in,
                                                              const at::Tensor& logits_in, int64_t metric,
                                                              double eps) {
  check_inputs(query_in, protos_in, metric);
  const int64_t T = query_in.size(0), Q = query_in.size(1), N = protos_in.size(1), D = query_in.size(2);
  for (const at::Tensor* x : {&grad_in, &logits_in}) {
    TORCH_CHECK_VALUE(x->is_cuda() && x->sizes() == at::IntArrayRef({T, Q, N}) &&
                          x->scalar_type() == query_in.scalar_type(),
                      "grad and logits must be CUDA tensors [T, Q, N] = [", T, ", ", Q, ", ", N, "] of dtype ",
                      query_in.scalar_type(), ", got ", x->sizes(), " of dtype ", x->scalar_type(), " on ",
                      x->device());
  }
  const c10::DeviceGuard guard(query_in.device());
  const at::Tensor query = query_in.contiguous(), protos = protos_in.contiguous();
  const at::Tensor grad = grad_in.contiguous(), logits = logits_in.contiguous();
  at::Tensor grad_query = at::empty_like(query), grad_protos = at::empty_like(protos);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "proto_logits_backward_cuda", [&] {
    using cuda_t = cuda_type_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    // Row norms for cosine, in the accumulation type.
    const bool cosine = metric == pymeta::proto_logits_cuda::kCosine;
    const auto norm_options = query.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor q_norms = at::empty({cosine ? T * Q : 0}, norm_options);
    at::Tensor p_norms = at::empty({cosine ? T * N : 0}, norm_options);
    const cudaError_t err = pymeta::proto_logits_cuda::launch_backward<cuda_t, acc_t>(
        reinterpret_cast<const cuda_t*>(grad.const_data_ptr<scalar_t>()),
        reinterpret_cast<const cuda_t*>(logits.const_data_ptr<scalar_t>()),
        reinterpret_cast<const cuda_t*>(query.const_data_ptr<scalar_t>()),
        reinterpret_cast<const cuda_t*>(protos.const_data_ptr<scalar_t>()),
        reinterpret_cast<cuda_t*>(grad_query.mutable_data_ptr<scalar_t>()),
        reinterpret_cast<cuda_t*>(grad_protos.mutable_data_ptr<scalar_t>()), q_norms.mutable_data_ptr<acc_t>(),
        p_norms.mutable_data_ptr<acc_t>(), T, Q, N, D, static_cast<int>(metric), static_cast<acc_t>(eps),
        current_stream(query.device()));
    TORCH_CHECK(err == cudaSuccess, "proto_logits_backward CUDA kernel failed: ", cudaGetErrorString(err));
  });
  return {grad_query, grad_protos};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cuda, m) {
  m.def("proto_logits(Tensor query, Tensor protos, int metric, float eps) -> Tensor");
  m.def(
      "proto_logits_backward(Tensor grad, Tensor query, Tensor protos, Tensor logits, int metric, "
      "float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cuda, CUDA, m) {
  m.impl("proto_logits", &proto_logits_cuda);
  m.impl("proto_logits_backward", &proto_logits_backward_cuda);
}
