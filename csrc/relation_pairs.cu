// ATen binding of the CUDA kernels of pymeta::relation_pairs (csrc/relation_pairs.cuh).

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "cuda_binding.h"

#include <optional>
#include <tuple>

#include "relation_pairs.cuh"

namespace {

using pymeta::cuda_type_t;
using pymeta::current_stream;

struct Inputs {
  at::Tensor a, b, weight, bias, running_mean, running_var;  // contiguous; running_* undefined: batch statistics
  int64_t T, N, Q, C, HW;
};

Inputs prepare(const at::Tensor& classes, const at::Tensor& queries, const at::Tensor& weight, const at::Tensor& bias,
               const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK_VALUE(classes.is_cuda() && queries.is_cuda() && weight.is_cuda() && bias.is_cuda(),
                    "the cuda backend runs on CUDA tensors, got classes on ", classes.device());
  TORCH_CHECK_TYPE(classes.is_floating_point() && queries.scalar_type() == classes.scalar_type() &&
                       weight.scalar_type() == classes.scalar_type() && bias.scalar_type() == classes.scalar_type(),
                   "classes, queries, weight and bias must be floating-point tensors of one dtype");
  TORCH_CHECK_VALUE(classes.dim() == 5 && queries.dim() == 5 && classes.size(0) == queries.size(0) &&
                        classes.sizes().slice(2) == queries.sizes().slice(2),
                    "classes must be [T, N, C, H, W] and queries [T, Q, C, H, W], got shapes ", classes.sizes(),
                    " and ", queries.sizes());
  Inputs in{classes.contiguous(), queries.contiguous(), weight.contiguous(), bias.contiguous(), {}, {},
            classes.size(0), classes.size(1), queries.size(1), classes.size(2), classes.size(3) * classes.size(4)};
  for (const at::Tensor* p : {&in.weight, &in.bias}) {
    TORCH_CHECK_VALUE(p->dim() == 2 && p->size(0) == in.T && p->size(1) == in.C, "weight and bias must be [T, C] = [",
                      in.T, ", ", in.C, "], got shape ", p->sizes());
  }
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together or both be None");
  if (running_mean.has_value()) {
    in.running_mean = running_mean->to(classes.scalar_type()).contiguous();
    in.running_var = running_var->to(classes.scalar_type()).contiguous();
    TORCH_CHECK_VALUE(in.running_mean.numel() == in.T * in.C && in.running_var.numel() == in.T * in.C,
                      "running statistics must be [T, C] = [", in.T, ", ", in.C, "]");
  }
  return in;
}

template <typename scalar_t>
const cuda_type_t<scalar_t>* ptr(const at::Tensor& x) {
  return x.defined() ? reinterpret_cast<const cuda_type_t<scalar_t>*>(x.const_data_ptr<scalar_t>()) : nullptr;
}

template <typename scalar_t>
cuda_type_t<scalar_t>* mutable_ptr(at::Tensor& x) {
  return reinterpret_cast<cuda_type_t<scalar_t>*>(x.mutable_data_ptr<scalar_t>());
}

at::Tensor relation_pairs_cuda(const at::Tensor& classes, const at::Tensor& queries, const at::Tensor& weight,
                               const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, double eps) {
  const c10::DeviceGuard guard(classes.device());
  const Inputs in = prepare(classes, queries, weight, bias, running_mean, running_var);
  at::Tensor out = at::empty({in.T, in.Q, in.N, classes.size(2), classes.size(3), classes.size(4)}, in.a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.a.scalar_type(), "relation_pairs_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor stats = at::empty({2, in.T * in.C}, in.a.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* mean = stats.mutable_data_ptr<acc_t>();
    const cudaError_t err = pymeta::relation_pairs_cuda::launch_forward<cuda_type_t<scalar_t>, acc_t>(
        ptr<scalar_t>(in.a), ptr<scalar_t>(in.b), ptr<scalar_t>(in.weight), ptr<scalar_t>(in.bias),
        ptr<scalar_t>(in.running_mean), ptr<scalar_t>(in.running_var), static_cast<acc_t>(eps), mean,
        mean + in.T * in.C, mutable_ptr<scalar_t>(out), in.T, in.N, in.Q, in.C, in.HW, current_stream(out.device()));
    TORCH_CHECK(err == cudaSuccess, "relation_pairs CUDA kernel failed: ", cudaGetErrorString(err));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relation_pairs_backward_cuda(
    const at::Tensor& grad, const at::Tensor& classes, const at::Tensor& queries, const at::Tensor& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double eps) {
  const c10::DeviceGuard guard(classes.device());
  const Inputs in = prepare(classes, queries, weight, bias, running_mean, running_var);
  TORCH_CHECK_VALUE(grad.is_cuda() && grad.dim() == 6 && grad.size(0) == in.T && grad.size(1) == in.Q &&
                        grad.size(2) == in.N && grad.sizes().slice(3) == classes.sizes().slice(2),
                    "grad must be a CUDA tensor [T, Q, N, C, H, W], got shape ", grad.sizes());
  const at::Tensor g = grad.to(in.a.scalar_type()).contiguous();
  at::Tensor ga = at::zeros(in.a.sizes(), in.a.options()), gb = at::zeros(in.b.sizes(), in.b.options());
  at::Tensor s;  // [2, T, C] in acc_t: s[0] = sum gz (grad bias), s[1] = sum gz xhat (grad weight)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.a.scalar_type(), "relation_pairs_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = in.a.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    s = at::zeros({2, in.T, in.C}, acc_options);
    at::Tensor stats = at::empty({2, in.T * in.C}, acc_options);
    at::Tensor G = at::empty(in.a.sizes(), acc_options), H = at::empty(in.b.sizes(), acc_options);
    acc_t* mean = stats.mutable_data_ptr<acc_t>();
    acc_t* s1 = s.mutable_data_ptr<acc_t>();
    const cudaError_t err = pymeta::relation_pairs_cuda::launch_backward<cuda_type_t<scalar_t>, acc_t>(
        ptr<scalar_t>(g), ptr<scalar_t>(in.a), ptr<scalar_t>(in.b), ptr<scalar_t>(in.weight), ptr<scalar_t>(in.bias),
        ptr<scalar_t>(in.running_mean), ptr<scalar_t>(in.running_var), static_cast<acc_t>(eps), mean,
        mean + in.T * in.C, G.mutable_data_ptr<acc_t>(), H.mutable_data_ptr<acc_t>(), s1, s1 + in.T * in.C,
        mutable_ptr<scalar_t>(ga), mutable_ptr<scalar_t>(gb), in.T, in.N, in.Q, in.C, in.HW,
        current_stream(ga.device()));
    TORCH_CHECK(err == cudaSuccess, "relation_pairs_backward CUDA kernel failed: ", cudaGetErrorString(err));
  });
  return {ga, gb, s[1].to(weight.scalar_type()), s[0].to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cuda, m) {
  m.def(
      "relation_pairs(Tensor classes, Tensor queries, Tensor weight, Tensor bias, Tensor? running_mean, "
      "Tensor? running_var, float eps) -> Tensor");
  m.def(
      "relation_pairs_backward(Tensor grad, Tensor classes, Tensor queries, Tensor weight, Tensor bias, "
      "Tensor? running_mean, Tensor? running_var, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cuda, CUDA, m) {
  m.impl("relation_pairs", &relation_pairs_cuda);
  m.impl("relation_pairs_backward", &relation_pairs_backward_cuda);
}
