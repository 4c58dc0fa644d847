// C++ CPU kernels of pymeta::proto_logits and its fused backward.
//
// The distance kernels sum (q - p)^2 directly instead of expanding |q|^2 + |p|^2 - 2 q.p:
// with few prototypes per task (N ~ 5) the direct sum costs the same single pass over
// the query, it is exact to rounding however large the common offset of the features
// (the expansion loses everything below eps * |q|^2), and it is never negative.
//
// Speed: prototypes are processed kGroup at a time, so each query element is loaded once
// per group and the group's independent accumulators hide the FMA latency; the loops over
// D are written to vectorise, and the float/double entry points are compiled for
// AVX-512, AVX2+FMA and baseline x86-64, picked at load time (the JIT build passes no
// -march flag, so the cached library stays portable). at::parallel_for splits query rows
// (forward) or (task, D-chunk) pieces (backward). Half and bfloat16 inputs are computed
// in float (their at::opmath_type) and rounded once at the end.
//
// `metric` is the index in pymeta.ops.proto_logits.METRICS.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PYMETA_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYMETA_ISA_CLONES
#endif
// Inner kernels must be inlined into the cloned entry points to be compiled for their ISA.
#define PYMETA_INLINE inline __attribute__((always_inline))

namespace {

enum Metric : int64_t { kSqEuclidean = 0, kEuclidean = 1, kCosine = 2 };

constexpr int kGroup = 4;
// Backward work items are (task, D-chunk): enough pieces to keep every thread busy when
// T is small, and a chunk's gradient accumulators ([N + 1, kChunk]) stay in L1/L2.
constexpr int64_t kChunk = 512;

// The kernels below are templates over the element type T = float or double.
template <typename T>
struct Problem {
  const T* q;  // [tasks, Q, D]
  const T* p;  // [tasks, N, D]
  int64_t tasks, Q, N, D, metric;
};

// Portable SIMD through GCC/Clang vector extensions: each ISA clone lowers them to its own
// registers (one zmm, two ymm or four xmm for a 64-byte vector). The main loops use 64-byte
// vectors; reductions fold them to 32 bytes (8 floats / 4 doubles) first.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float wide __attribute__((vector_size(64)));
  typedef float type __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;  // of `type`
};
template <>
struct Simd<double> {
  typedef double wide __attribute__((vector_size(64)));
  typedef double type __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

template <typename V, typename T>
PYMETA_INLINE V load(const T* p) {  // unaligned
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The sum of the two 32-byte halves of a 64-byte vector.
template <typename T>
PYMETA_INLINE typename Simd<T>::type fold(typename Simd<T>::wide v) {
  if constexpr (Simd<T>::kLanes == 8) {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  } else {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  }
}

// out[g] = sum of the lanes of v[g], for 4 vectors at once: two rounds of pairwise
// shuffles and adds instead of 4 serial chains of lane additions.
template <typename T>
PYMETA_INLINE void sum_lanes4(const typename Simd<T>::type* v, T* out) {
  if constexpr (Simd<T>::kLanes == 8) {
    const auto u0 = __builtin_shufflevector(v[0], v[1], 0, 8, 2, 10, 4, 12, 6, 14) +
                    __builtin_shufflevector(v[0], v[1], 1, 9, 3, 11, 5, 13, 7, 15);
    const auto u1 = __builtin_shufflevector(v[2], v[3], 0, 8, 2, 10, 4, 12, 6, 14) +
                    __builtin_shufflevector(v[2], v[3], 1, 9, 3, 11, 5, 13, 7, 15);
    // w = [sum of lanes 0-3 of v0..v3, sum of lanes 4-7 of v0..v3]
    const auto w = __builtin_shufflevector(u0, u1, 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(u0, u1, 2, 3, 10, 11, 6, 7, 14, 15);
    for (int g = 0; g < 4; ++g) out[g] = w[g] + w[g + 4];
  } else {
    const auto u0 = __builtin_shufflevector(v[0], v[1], 0, 4, 2, 6) + __builtin_shufflevector(v[0], v[1], 1, 5, 3, 7);
    const auto u1 = __builtin_shufflevector(v[2], v[3], 0, 4, 2, 6) + __builtin_shufflevector(v[2], v[3], 1, 5, 3, 7);
    const auto w = __builtin_shufflevector(u0, u1, 0, 1, 4, 5) + __builtin_shufflevector(u0, u1, 2, 3, 6, 7);
    for (int g = 0; g < 4; ++g) out[g] = w[g];
  }
}

template <bool kDot, typename V>
PYMETA_INLINE V term(V x, V y) {
  if constexpr (kDot) {
    return x * y;
  } else {
    return (x - y) * (x - y);
  }
}

// Forward for G <= 4 prototypes (rows D apart from p) against the query row q:
// out[g] = sum_d (q - p_g)^2, or q . p_g when kDot. One 64-byte accumulator per prototype
// (G independent FMA chains, each query vector loaded once per group), 32-byte steps for
// the rest, then one joint reduction and a scalar tail.
template <int G, bool kDot, typename T>
PYMETA_INLINE void forward_group(const T* q, const T* p, int64_t D, T* out) {
  using V = typename Simd<T>::type;
  using W = typename Simd<T>::wide;
  constexpr int L = Simd<T>::kLanes;
  W wide[G] = {};
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    const W x = load<W>(q + d);
    for (int g = 0; g < G; ++g) wide[g] += term<kDot>(x, load<W>(p + g * D + d));
  }
  V acc[4] = {};
  for (int g = 0; g < G; ++g) acc[g] = fold<T>(wide[g]);
  if (d + L <= D) {
    const V x = load<V>(q + d);
    for (int g = 0; g < G; ++g) acc[g] += term<kDot>(x, load<V>(p + g * D + d));
    d += L;
  }
  T total[4];
  sum_lanes4<T>(acc, total);
  for (int g = 0; g < G; ++g) {
    for (int64_t e = d; e < D; ++e) {
      const T x = q[e], y = p[g * D + e];
      total[g] += kDot ? x * y : (x - y) * (x - y);
    }
    out[g] = total[g];
  }
}

// out[n] for all N prototypes of a task, kGroup at a time.
template <bool kDot, typename T>
PYMETA_INLINE void forward_row(const T* q, const T* p, int64_t N, int64_t D, T* out) {
  int64_t n = 0;
  for (; n + kGroup <= N; n += kGroup) forward_group<kGroup, kDot>(q, p + n * D, D, out + n);
  for (; n < N; ++n) forward_group<1, kDot>(q, p + n * D, D, out + n);
}

// Euclidean norms of rows [begin, end) of x (rows of length D).
template <typename T>
PYMETA_INLINE void row_norms(const T* x, int64_t D, int64_t begin, int64_t end, T* norms) {
  for (int64_t r = begin; r < end; ++r) {
    forward_group<1, true>(x + r * D, x + r * D, D, norms + r);
    norms[r] = std::sqrt(norms[r]);
  }
}

PYMETA_ISA_CLONES void row_norms_isa(const float* x, int64_t D, int64_t begin, int64_t end, float* norms) {
  row_norms(x, D, begin, end, norms);
}
PYMETA_ISA_CLONES void row_norms_isa(const double* x, int64_t D, int64_t begin, int64_t end, double* norms) {
  row_norms(x, D, begin, end, norms);
}

// Cosine: 1 / max(|x_r|, eps) for `rows` rows of length D; with `k`, also k_r = (1 / |x_r|)^2
// where the norm is not clamped and 0 where it is (the clamp has zero slope there).
template <typename T>
std::vector<T> inverse_norms(const T* x, int64_t rows, int64_t D, T eps, std::vector<T>* k = nullptr) {
  std::vector<T> inv(rows);
  if (k != nullptr) k->resize(rows);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    row_norms_isa(x, D, b, e, inv.data());
    for (int64_t r = b; r < e; ++r) {
      const T norm = inv[r];
      inv[r] = T(1) / std::max(norm, eps);
      if (k != nullptr) (*k)[r] = norm > eps ? inv[r] * inv[r] : T(0);
    }
  });
  return inv;
}

// Logits of query rows [begin, end). p_inv: cosine's inverse prototype norms.
template <typename T>
PYMETA_INLINE void forward_rows(const Problem<T>& a, T* out, const T* p_inv, T eps, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t t = r / a.Q;
    const T* qr = a.q + r * a.D;
    const T* pt = a.p + t * a.N * a.D;
    T* o = out + r * a.N;
    if (a.metric == kCosine) {
      T qq;
      forward_group<1, true>(qr, qr, a.D, &qq);
      const T q_inv = T(1) / std::max(std::sqrt(qq), eps);
      forward_row<true>(qr, pt, a.N, a.D, o);
      for (int64_t n = 0; n < a.N; ++n) o[n] *= q_inv * p_inv[t * a.N + n];
    } else {
      forward_row<false>(qr, pt, a.N, a.D, o);
      for (int64_t n = 0; n < a.N; ++n) o[n] = a.metric == kSqEuclidean ? -o[n] : -std::sqrt(o[n]);
    }
  }
}

PYMETA_ISA_CLONES void forward_rows_isa(const Problem<float>& a, float* out, const float* p_inv, float eps,
                                        int64_t begin, int64_t end) {
  forward_rows(a, out, p_inv, eps, begin, end);
}
PYMETA_ISA_CLONES void forward_rows_isa(const Problem<double>& a, double* out, const double* p_inv, double eps,
                                        int64_t begin, int64_t end) {
  forward_rows(a, out, p_inv, eps, begin, end);
}

// Gradient contributions of G prototypes (rows D apart from p, already offset to the
// chunk) for R query rows q[r] (chunks of length len; weights w[r * N + g]):
//   Euclidean: e = w_rg (q_r - p_g); gq_r += e; gp_g -= e   (w: weight per unit difference)
//   cosine:    gq_r += w_rg p_g;     gp_g += w_rg q_r      (w = g rq rp_g)
template <int R, int G, bool kCos, typename T>
PYMETA_INLINE void backward_group(const T* const* q, const T* p, int64_t N, int64_t D, int64_t len, const T* w,
                                  T* const* gq, T* gp) {
  const T* pg[G];
  T* gpg[G];
  T wg[R][G];
  for (int g = 0; g < G; ++g) {
    pg[g] = p + g * D;
    gpg[g] = gp + g * len;
    for (int r = 0; r < R; ++r) wg[r][g] = w[r * N + g];
  }
#pragma omp simd
  for (int64_t d = 0; d < len; ++d) {
    T x[R], sum[R];
    for (int r = 0; r < R; ++r) {
      x[r] = q[r][d];
      sum[r] = 0;
    }
    for (int g = 0; g < G; ++g) {
      const T y = pg[g][d];
      T to_p = 0;
      for (int r = 0; r < R; ++r) {
        if constexpr (kCos) {
          sum[r] += wg[r][g] * y;
          to_p += wg[r][g] * x[r];
        } else {
          const T e = wg[r][g] * (x[r] - y);
          sum[r] += e;
          to_p -= e;
        }
      }
      gpg[g][d] += to_p;
    }
    for (int r = 0; r < R; ++r) gq[r][d] += sum[r];
  }
}

template <int R, bool kCos, typename T>
PYMETA_INLINE void backward_rows(const T* const* q, const T* p, int64_t N, int64_t D, int64_t len, const T* w,
                                 T* const* gq, T* gp) {
  int64_t n = 0;
  for (; n + kGroup <= N; n += kGroup) {
    backward_group<R, kGroup, kCos>(q, p + n * D, N, D, len, w + n, gq, gp + n * len);
  }
  for (; n < N; ++n) backward_group<R, 1, kCos>(q, p + n * D, N, D, len, w + n, gq, gp + n * len);
}

template <typename T>
struct Backward {
  const T* g;  // [tasks, Q, N] upstream gradient
  const T* o;  // [tasks, Q, N] forward logits
  T* gq;       // [tasks, Q, D]
  T* gp;       // [tasks, N, D]
  // Cosine only: inverse clamped norms and radial factors of queries and prototypes.
  const T *q_inv, *q_k, *p_inv, *p_k;
  int64_t chunks;
};

// Gradients for work items [begin, end), each a (task, D-chunk) pair. grad_q rows of the
// chunk are written directly, kRows query rows at a time (they share the prototype loads
// and the grad_p accumulator traffic); grad_p of the chunk accumulates over the queries.
template <typename T>
PYMETA_INLINE void backward_items(const Problem<T>& a, const Backward<T>& b, int64_t begin, int64_t end) {
  constexpr int kRows = 4;
  const int64_t Q = a.Q, N = a.N, D = a.D;
  const bool cosine = a.metric == kCosine;
  std::vector<T> w(kRows * N), col(N), gp_acc(N * std::min(D, kChunk));
  for (int64_t item = begin; item < end; ++item) {
    const int64_t t = item / b.chunks, d0 = (item % b.chunks) * kChunk, len = std::min(kChunk, D - d0);
    const T* pt = a.p + t * N * D + d0;
    std::fill_n(gp_acc.begin(), N * len, T(0));
    std::fill(col.begin(), col.end(), T(0));
    for (int64_t q0 = 0; q0 < Q; q0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, Q - q0));
      const T* qr[kRows];
      T* gqr[kRows];
      for (int i = 0; i < rows; ++i) {
        const int64_t r = t * Q + q0 + i;
        T* wr = w.data() + i * N;
        T self = 0;  // cosine: coefficient of q itself in grad_q
        for (int64_t n = 0; n < N; ++n) {
          const T gn = b.g[r * N + n], on = b.o[r * N + n];
          if (cosine) {
            // grad_q = rq sum_n g rp_n p_n - (sum_n g out) kq q
            // grad_p_n = rp_n sum_q g rq q - (sum_q g out) kp_n p_n
            wr[n] = gn * b.q_inv[r] * b.p_inv[t * N + n];
            self -= gn * on * b.q_k[r];
            col[n] += gn * on;
          } else {
            // d(out)/dq per unit difference: -2 (sqeuclidean), 1 / out (euclidean, out = -|q - p|;
            // 0 at distance 0, where the gradient is taken to be 0).
            wr[n] = a.metric == kSqEuclidean ? T(-2) * gn : (on < 0 ? gn / on : T(0));
          }
        }
        qr[i] = a.q + r * D + d0;
        gqr[i] = b.gq + r * D + d0;
        for (int64_t d = 0; d < len; ++d) gqr[i][d] = self * qr[i][d];
      }
      if (rows == kRows) {
        if (cosine) {
          backward_rows<kRows, true>(qr, pt, N, D, len, w.data(), gqr, gp_acc.data());
        } else {
          backward_rows<kRows, false>(qr, pt, N, D, len, w.data(), gqr, gp_acc.data());
        }
      } else {  // the last Q % kRows rows, one at a time
        for (int i = 0; i < rows; ++i) {
          if (cosine) {
            backward_rows<1, true>(qr + i, pt, N, D, len, w.data() + i * N, gqr + i, gp_acc.data());
          } else {
            backward_rows<1, false>(qr + i, pt, N, D, len, w.data() + i * N, gqr + i, gp_acc.data());
          }
        }
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      const T self = cosine ? -col[n] * b.p_k[t * N + n] : T(0);
      const T* pn = pt + n * D;
      const T* acc = gp_acc.data() + n * len;
      T* dst = b.gp + (t * N + n) * D + d0;
      for (int64_t d = 0; d < len; ++d) dst[d] = acc[d] + self * pn[d];
    }
  }
}

PYMETA_ISA_CLONES void backward_items_isa(const Problem<float>& a, const Backward<float>& b, int64_t begin,
                                          int64_t end) {
  backward_items(a, b, begin, end);
}
PYMETA_ISA_CLONES void backward_items_isa(const Problem<double>& a, const Backward<double>& b, int64_t begin,
                                          int64_t end) {
  backward_items(a, b, begin, end);
}

void check_inputs(const at::Tensor& query, const at::Tensor& protos, int64_t metric) {
  TORCH_CHECK_VALUE(metric >= kSqEuclidean && metric <= kCosine,
                    "metric index must be 0 (sqeuclidean), 1 (euclidean) or 2 (cosine), got ", metric);
  TORCH_CHECK_TYPE(query.is_floating_point(), "query must be a floating-point tensor, got dtype ",
                   query.scalar_type());
  TORCH_CHECK_TYPE(protos.scalar_type() == query.scalar_type(), "query and protos must have one dtype, got ",
                   query.scalar_type(), " and ", protos.scalar_type());
  TORCH_CHECK_VALUE(query.dim() == 3, "query must have 3 dims [T, Q, D], got shape ", query.sizes());
  TORCH_CHECK_VALUE(protos.dim() == 3, "protos must have 3 dims [T, N, D], got shape ", protos.sizes());
  TORCH_CHECK_VALUE(query.size(0) == protos.size(0) && query.size(2) == protos.size(2),
                    "query [T, Q, D] and protos [T, N, D] must agree on T and D, got shapes ", query.sizes(),
                    " and ", protos.sizes());
  TORCH_CHECK_VALUE(query.device().is_cpu() && protos.device().is_cpu(),
                    "the cpp backend runs on CPU tensors, got query on ", query.device(), " and protos on ",
                    protos.device());
}

// Contiguous copy in the accumulation type (a no-op for contiguous float/double).
at::Tensor upcast(const at::Tensor& x) {
  return x.to(at::toOpMathType(x.scalar_type())).contiguous();
}

template <typename T>
Problem<T> problem(const at::Tensor& query, const at::Tensor& protos, int64_t metric) {
  return {query.const_data_ptr<T>(), protos.const_data_ptr<T>(), query.size(0), query.size(1), protos.size(1),
          query.size(2), metric};
}

template <typename T>
void forward_kernel(const at::Tensor& query, const at::Tensor& protos, at::Tensor& out, int64_t metric, double eps) {
  const Problem<T> a = problem<T>(query, protos, metric);
  const T eps_ = static_cast<T>(eps);
  // Cosine: the prototype norms are shared by all queries of a task, compute them once.
  const std::vector<T> p_inv = metric == kCosine ? inverse_norms<T>(a.p, a.tasks * a.N, a.D, eps_) : std::vector<T>();
  T* o = out.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.N * a.D, 1));
  at::parallel_for(0, a.tasks * a.Q, grain,
                   [&](int64_t begin, int64_t end) { forward_rows_isa(a, o, p_inv.data(), eps_, begin, end); });
}

template <typename T>
void backward_kernel(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& protos,
                     const at::Tensor& logits, at::Tensor& grad_query, at::Tensor& grad_protos, int64_t metric,
                     double eps) {
  const Problem<T> a = problem<T>(query, protos, metric);
  const T eps_ = static_cast<T>(eps);
  std::vector<T> q_inv, q_k, p_inv, p_k;
  if (metric == kCosine) {
    q_inv = inverse_norms<T>(a.q, a.tasks * a.Q, a.D, eps_, &q_k);
    p_inv = inverse_norms<T>(a.p, a.tasks * a.N, a.D, eps_, &p_k);
  }
  const int64_t chunks = std::max<int64_t>(1, (a.D + kChunk - 1) / kChunk);
  const Backward<T> b{grad.const_data_ptr<T>(),
                      logits.const_data_ptr<T>(),
                      grad_query.mutable_data_ptr<T>(),
                      grad_protos.mutable_data_ptr<T>(),
                      q_inv.data(),
                      q_k.data(),
                      p_inv.data(),
                      p_k.data(),
                      chunks};
  at::parallel_for(0, a.tasks * chunks, 1, [&](int64_t begin, int64_t end) { backward_items_isa(a, b, begin, end); });
}

at::Tensor proto_logits_cpu(const at::Tensor& query_in, const at::Tensor& protos_in, int64_t metric, double eps) {
  check_inputs(query_in, protos_in, metric);
  const at::Tensor query = upcast(query_in), protos = upcast(protos_in);
  at::Tensor out = at::empty({query.size(0), query.size(1), protos.size(1)}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "proto_logits_cpu",
                             [&] { forward_kernel<scalar_t>(query, protos, out, metric, eps); });
  return out.to(query_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> proto_logits_backward_cpu(const at::Tensor& grad_in, const at::Tensor& query_in,
                                                             const at::Tensor& protos_in,
                                                             const at::Tensor& logits_in, int64_t metric,
                                                             double eps) {
  check_inputs(query_in, protos_in, metric);
  const int64_t T = query_in.size(0), Q = query_in.size(1), N = protos_in.size(1);
  for (const at::Tensor* x : {&grad_in, &logits_in}) {
    TORCH_CHECK_VALUE(x->sizes() == at::IntArrayRef({T, Q, N}) && x->scalar_type() == query_in.scalar_type(),
                      "grad and logits must be [T, Q, N] = [", T, ", ", Q, ", ", N, "] of dtype ",
                      query_in.scalar_type(), ", got ", x->sizes(), " of dtype ", x->scalar_type());
  }
  const at::Tensor query = upcast(query_in), protos = upcast(protos_in);
  const at::Tensor grad = upcast(grad_in), logits = upcast(logits_in);
  at::Tensor grad_query = at::empty_like(query), grad_protos = at::empty_like(protos);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "proto_logits_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad, query, protos, logits, grad_query, grad_protos, metric, eps);
  });
  return {grad_query.to(query_in.scalar_type()), grad_protos.to(protos_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pymeta_cpu, m) {
  m.def("proto_logits(Tensor query, Tensor protos, int metric, float eps) -> Tensor");
  m.def(
      "proto_logits_backward(Tensor grad, Tensor query, Tensor protos, Tensor logits, int metric, "
      "float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pymeta_cpu, CPU, m) {
  m.impl("proto_logits", &proto_logits_cpu);
  m.impl("proto_logits_backward", &proto_logits_backward_cpu);
}
