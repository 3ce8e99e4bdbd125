// The team of team.h as an op, for the tests: which threads run their part, that all pass the barriers, that a
// thread's error reaches the caller without leaving the others waiting, and that no team inside another
// parallel region means one part.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "team.h"

namespace bnrhn_kernels {
namespace {

// → the ids of the threads that ran their part. `failing`: the thread that throws after the first barrier (−1:
// none); `nested`: asked for from inside another parallel region (of two threads, nesting off)
std::vector<int64_t> team_check(int64_t parts, int64_t failing, bool nested) {
  std::vector<int64_t> ran;
  std::mutex lock;
  auto body = [&](Team& team) {
    team.sync();
    TORCH_CHECK(team.id() != failing, "team_check: thread ", team.id(), " fails");
    team.sync();
    team.sync();
    std::lock_guard<std::mutex> guard(lock);
    ran.push_back(team.id());
  };
  if (!nested) {
    run_loop(parts, 0, body);
    return ran;
  }
#ifdef _OPENMP
  const int levels = omp_get_max_active_levels();
  omp_set_max_active_levels(1);
#pragma omp parallel num_threads(2)
  {
#pragma omp single
    run_loop(parts, 0, body);
  }
  omp_set_max_active_levels(levels);
#else
  run_loop(parts, 0, body);
#endif
  return ran;
}

}  // namespace
}  // namespace bnrhn_kernels

int64_t last_team_size() { return bnrhn_kernels::last_team_size.load(); }

TORCH_LIBRARY_FRAGMENT(bnrhn_gates, m) {
  m.def("last_team_size() -> int", &last_team_size);  // the threads the last loop ran on
  m.def("team_check(int parts, int failing, bool nested) -> int[]", &bnrhn_kernels::team_check);  // no tensors: one
                                                                                                  // kernel for all
}
