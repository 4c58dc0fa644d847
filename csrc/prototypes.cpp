// C++ CPU kernels of pymeta::prototypes (per-task class means) and its backward.
//
// Forward: one pass over the support set per task, adding each row into its class's
// accumulator (inner loop over D is contiguous, `omp simd`), then a scale by 1 / count.
// Backward: grad_support[t, s] = grad_protos[t, labels[t, s]] / count[t, labels[t, s]].
// Labels are checked while counting (range, and no empty class) with the same messages as
// pymeta._value_checks.class_counts, so every backend fails the same way.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

// labels: [T, S] int64, contiguous. Returns the [T, n_way] class counts.
std::vector<int64_t> class_counts(const at::Tensor& labels, int64_t n_way) {
  const int64_t T = labels.size(0), S = labels.size(1);
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  std::vector<int64_t> counts(T * n_way, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t v = lab[t * S + s];
      TORCH_CHECK_VALUE(v >= 0 && v < n_way, "labels must be in [0, n_way) = [0, ", n_way, "), got labels[", t,
                        ", ", s, "] = ", v);
      ++counts[t * n_way + v];
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < n_way; ++c) {
      TORCH_CHECK_VALUE(counts[t * n_way + c] > 0, "class ", c, " has no example in task ", t,
                        " of labels: every class in [0, n_way) = [0, ", n_way,
                        ") needs at least one support example per task");
    }
  }
  return counts;
}

at::Tensor long_labels(const at::Tensor& labels, int64_t T, int64_t S) {
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels must be an integer tensor of class labels, got dtype ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 2 && labels.size(0) == T && labels.size(1) == S,
                    "labels must be [T, S] = [", T, ", ", S, "], got shape ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device().is_cpu(), "the cpp backend runs on CPU tensors, got labels on ",
                    labels.device());
  return labels.to(at::kLong).contiguous();
}

template <typename scalar_t>
void prototypes_kernel(const at::Tensor& support, const at::Tensor& labels, const std::vector<int64_t>& counts,
                       at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = support.size(0), S = support.size(1), D = support.size(2), n_way = out.size(1);
  const scalar_t* x = support.const_data_ptr<scalar_t>();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(n_way * D);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(sums.begin(), sums.end(), acc_t(0));
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* row = x + (t * S + s) * D;
        acc_t* acc = sums.data() + lab[t * S + s] * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(row[d]);
      }
      for (int64_t n = 0; n < n_way; ++n) {
        const acc_t inv = acc_t(1) / static_cast<acc_t>(counts[t * n_way + n]);  // multiply: no divide per element
        const acc_t* acc = sums.data() + n * D;
        scalar_t* dst = o + (t * n_way + n) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d] * inv);
      }
    }
  });
}

at::Tensor prototypes_cpu(const at::Tensor& support_in, const at::Tensor& labels_in, int64_t n_way) {
  TORCH_CHECK_TYPE(support_in.is_floating_point(), "support must be a floating-point tensor, got dtype ",
                   support_in.scalar_type());
  TORCH_CHECK_VALUE(support_in.dim() == 3, "support must have 3 dims [T, S, D], got shape ", support_in.sizes());
  TORCH_CHECK_VALUE(support_in.device().is_cpu(), "the cpp backend runs on CPU tensors, got support on ",
                    support_in.device());
  TORCH_CHECK_VALUE(n_way >= 1, "n_way must be >= 1, got ", n_way);
  const int64_t T = support_in.size(0), S = support_in.size(1), D = support_in.size(2);
  const at::Tensor labels = long_labels(labels_in, T, S);
  const std::vector<int64_t> counts = class_counts(labels, n_way);
  const at::Tensor support = support_in.contiguous();
  at::Tensor out = at::empty({T, n_way, D}, support.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, support.scalar_type(), "prototypes_cpu",
                                  [&] { prototypes_kernel<scalar_t>(support, labels, counts, out); });
  return out;
}

template <typename scalar_t>
void prototypes_backward_kernel(const at::Tensor& grad, const at::Tensor& labels, const std::vector<int64_t>& counts,
                                at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_way = grad.size(1), D = grad.size(2), S = labels.size(1), rows = out.size(0) * S;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int64_t* lab = labels.const_data_ptr<int64_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / S, c = lab[r];
      const acc_t inv = acc_t(1) / static_cast<acc_t>(counts[t * n_way + c]);
      const scalar_t* src = g + (t * n_way + c) * D;
      scalar_t* dst = o + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * inv);
    }
  });
}

at::Tensor prototypes_backward_cpu(const at::Tensor& grad_in, const at::Tensor& labels_in, int64_t n_way) {
  TORCH_CHECK_VALUE(grad_in.dim() == 3 && grad_in.size(1) == n_way,
                    "grad must be [T, n_way, D] with n_way = ", n_way, ", got shape ", grad_in.sizes());
  TORCH_CHECK_VALUE(grad_in.device().is_cpu(), "the cpp backend runs on CPU tensors, got grad on ",
                    grad_in.device());
  const int64_t T = grad_in.size(0), D = grad_in.size(2);
  TORCH_CHECK_VALUE(labels_in.dim() == 2, "labels must have 2 dims [T, S], got shape ", labels_in.sizes());
  const int64_t S = labels_in.size(1);
  const at::Tensor labels = long_labels(labels_in, T, S);
  const std::vector<int64_t> counts = class_counts(labels, n_way);
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty({T, S, D}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "prototypes_backward_cpu",
                                  [&] { prototypes_backward_kernel<scalar_t>(grad, labels, counts, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("prototypes(Tensor support, Tensor labels, int n_way) -> Tensor");
  m.def("prototypes_backward(Tensor grad, Tensor labels, int n_way) -> Tensor");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("prototypes", &prototypes_cpu);
  m.impl("prototypes_backward", &prototypes_backward_cpu);
}
