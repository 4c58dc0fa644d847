// Prints what the host side of pymeta's CUDA launchers computes, for tests/test_cuda_launch.py:
// the entry tables and grids of csrc/*_launch.h (the code csrc/*.cu runs before a launch),
// compiled for the CPU. One command per input line, one JSON object per output line:
//
//   layout
//   inner_sgd_forward  has_lr  n  (rows cols p_rs g_rs lr_rs lr_cs) x n
//   inner_sgd_backward need_grads need_lr has_lr  n  (rows cols go_rs g_rs lr_rs lr_cs) x n
//   prototypes T N S D
//   proto_logits T Q N D
//
// Pointers are stand-ins that name their role: 16 * (k + 1) + j for operand j of entry k.

#include <cstddef>
#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "inner_sgd_launch.h"
#include "proto_logits_launch.h"
#include "prototypes_launch.h"

namespace {

using namespace pymeta;
namespace isgd = pymeta::inner_sgd_cuda;

const void* ptr(int64_t k, int64_t j) { return reinterpret_cast<const void*>(16 * (k + 1) + j); }
void* mut(int64_t k, int64_t j) { return const_cast<void*>(ptr(k, j)); }
int64_t id(const void* p) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(p)); }

std::string launch(const Launch& l) {
  return "[" + std::to_string(l.x) + ", " + std::to_string(l.y) + ", " + std::to_string(l.threads) + "]";
}

template <typename... Values>
std::string row(Values... values) {
  std::ostringstream out;
  out << "[";
  const char* sep = "";
  ((out << sep << values, sep = ", "), ...);
  out << "]";
  return out.str();
}

#define FIELD(T, f) row("\"" #f "\"", offsetof(T, f), sizeof(T::f))
#define STRUCT(T, ...) "\"" #T "\": {\"size\": " + std::to_string(sizeof(T)) + ", \"align\": " + \
                           std::to_string(alignof(T)) + ", \"fields\": [" + __VA_ARGS__ + "]}"

std::string quoted_fields(std::vector<std::string> fields) {
  std::string out;
  for (size_t i = 0; i < fields.size(); ++i) out += (i ? ", " : "") + fields[i];
  return out;
}

void layout() {
  using isgd::BackwardEntry;
  using isgd::ForwardEntry;
  using isgd::ReduceEntry;
  using isgd::Shape;
  std::vector<std::string> shape = {FIELD(Shape, rows), FIELD(Shape, cols), FIELD(Shape, p_rs),
                                    FIELD(Shape, g_rs), FIELD(Shape, lr_rs), FIELD(Shape, lr_cs)};
  std::vector<std::string> forward = {FIELD(ForwardEntry, p), FIELD(ForwardEntry, g), FIELD(ForwardEntry, out),
                                      FIELD(ForwardEntry, lr), FIELD(ForwardEntry, shape),
                                      FIELD(ForwardEntry, first_tile)};
  std::vector<std::string> backward = {FIELD(BackwardEntry, go), FIELD(BackwardEntry, g), FIELD(BackwardEntry, lr),
                                       FIELD(BackwardEntry, grad_g), FIELD(BackwardEntry, grad_lr),
                                       FIELD(BackwardEntry, shape), FIELD(BackwardEntry, partial),
                                       FIELD(BackwardEntry, first_tile)};
  std::vector<std::string> reduce = {FIELD(ReduceEntry, grad_lr), FIELD(ReduceEntry, partial),
                                     FIELD(ReduceEntry, rows), FIELD(ReduceEntry, tiles),
                                     FIELD(ReduceEntry, per_task)};
  std::cout << "{" << STRUCT(Shape, quoted_fields(shape)) << ", " << STRUCT(ForwardEntry, quoted_fields(forward)) << ", "
            << STRUCT(BackwardEntry, quoted_fields(backward)) << ", " << STRUCT(ReduceEntry, quoted_fields(reduce))
            << ", \"constants\": {\"kForwardThreads\": " << isgd::kForwardThreads
            << ", \"kForwardTile\": " << isgd::kForwardTile << ", \"kBackwardThreads\": " << isgd::kBackwardThreads
            << ", \"kReduceThreads\": " << isgd::kReduceThreads << "}}\n";
}

std::vector<isgd::Shape> shapes(std::istream& in) {
  int64_t n = 0;
  in >> n;
  std::vector<isgd::Shape> out(n);
  for (auto& s : out) in >> s.rows >> s.cols >> s.p_rs >> s.g_rs >> s.lr_rs >> s.lr_cs;
  return out;
}

void inner_sgd_forward(std::istream& in) {
  int has_lr = 0;
  in >> has_lr;
  isgd::ForwardPlan plan;
  const auto list = shapes(in);
  for (size_t k = 0; k < list.size(); ++k) plan.add(ptr(k, 0), ptr(k, 1), mut(k, 2), has_lr ? ptr(k, 3) : nullptr, list[k]);
  std::cout << "{\"launch\": " << launch(plan.launch()) << ", \"table\": [";
  for (size_t i = 0; i < plan.table.size(); ++i) {
    const auto& e = plan.table[i];
    std::cout << (i ? ", " : "")
              << row(id(e.p), id(e.g), id(e.out), id(e.lr), e.shape.rows, e.shape.cols, e.shape.p_rs, e.shape.g_rs,
                     e.shape.lr_rs, e.shape.lr_cs, e.first_tile);
  }
  std::cout << "]}\n";
}

void inner_sgd_backward(std::istream& in) {
  int need_grads = 0, need_lr = 0, has_lr = 0;
  in >> need_grads >> need_lr >> has_lr;
  isgd::BackwardPlan plan;
  const auto list = shapes(in);
  for (size_t k = 0; k < list.size(); ++k) {
    plan.add(ptr(k, 0), need_lr ? ptr(k, 1) : nullptr, has_lr ? ptr(k, 2) : nullptr, need_grads ? mut(k, 3) : nullptr,
             need_lr ? mut(k, 4) : nullptr, list[k]);
  }
  std::cout << "{\"launch\": " << launch(plan.launch()) << ", \"reduce_launch\": " << launch(plan.reduce_launch())
            << ", \"partials\": " << plan.partials << ", \"table\": [";
  for (size_t i = 0; i < plan.table.size(); ++i) {
    const auto& e = plan.table[i];
    std::cout << (i ? ", " : "")
              << row(id(e.go), id(e.g), id(e.lr), id(e.grad_g), id(e.grad_lr), e.shape.rows, e.shape.cols,
                     e.shape.p_rs, e.shape.g_rs, e.shape.lr_rs, e.shape.lr_cs, e.partial, e.first_tile);
  }
  std::cout << "], \"reduce\": [";
  for (size_t i = 0; i < plan.reduce.size(); ++i) {
    const auto& r = plan.reduce[i];
    std::cout << (i ? ", " : "") << row(id(r.grad_lr), r.partial, r.rows, r.tiles, r.per_task);
  }
  std::cout << "]}\n";
}

void prototypes(std::istream& in) {
  int64_t T = 0, N = 0, S = 0, D = 0;
  in >> T >> N >> S >> D;
  namespace k = pymeta::prototypes_cuda;
  std::cout << "{\"counts\": " << launch(k::counts_launch(T, N)) << ", \"forward\": " << launch(k::forward_launch(T, N, D))
            << ", \"backward\": " << launch(k::backward_launch(T, S, D)) << "}\n";
}

void proto_logits(std::istream& in) {
  int64_t T = 0, Q = 0, N = 0, D = 0;
  in >> T >> Q >> N >> D;
  namespace k = pymeta::proto_logits_cuda;
  std::cout << "{\"forward\": " << launch(k::forward_launch(T, Q)) << ", \"query_norms\": "
            << launch(k::norms_launch(T * Q)) << ", \"proto_norms\": " << launch(k::norms_launch(T * N))
            << ", \"grad_query\": " << launch(k::grad_query_launch(T, Q, D)) << ", \"grad_protos\": "
            << launch(k::grad_protos_launch(T, N, D)) << "}\n";
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string command;
    in >> command;
    if (command == "layout") {
      layout();
    } else if (command == "inner_sgd_forward") {
      inner_sgd_forward(in);
    } else if (command == "inner_sgd_backward") {
      inner_sgd_backward(in);
    } else if (command == "prototypes") {
      prototypes(in);
    } else if (command == "proto_logits") {
      proto_logits(in);
    } else {
      std::cerr << "unknown command: " << command << "\n";
      return 2;
    }
  }
  return 0;
}
