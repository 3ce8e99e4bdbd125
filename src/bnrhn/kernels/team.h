// A batch's rows shared by a team of threads: the loops' batch split ("parts").
//
// A recurrent step's rows are independent of each other except where batch norm takes statistics over them. At
// hidden size 128 the step is a product of ~6 MFLOP, which MKL spreads over the threads with a fork and join per
// call, then elementwise passes that run on one thread while the others wait. Split instead, each thread takes
// a contiguous range of every step's rows for the whole sequence: its products run on one thread (MKL runs
// single-threaded inside an OpenMP parallel region), its elementwise passes on its own rows, and the threads
// meet only where a batch norm combines column sums, and where a step has fewer rows than the one before (the
// ranges move: a thread then reads rows another one wrote).
//
// The team is OpenMP's (PyTorch's own runtime, the threads its operators use), with a barrier of our own rather
// than `#pragma omp barrier`, so that a thread whose work throws (a failed allocation in an operator) releases
// the others instead of leaving them waiting: they stop at their next barrier and the first error is rethrown
// on the calling thread. MKL runs single-threaded inside the team while nested parallelism is off (OpenMP's
// default); with OMP_MAX_ACTIVE_LEVELS > 1 each thread's products could start threads of their own. Built
// without OpenMP, a loop runs in one part.
#pragma once

#include <ATen/ThreadLocalState.h>
#include <c10/util/Exception.h>
#include <c10/util/ParallelGuard.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace bnrhn_kernels {

// Thrown inside a team when another of its threads has failed: unwinds this one without an error of its own
struct TeamAbandoned {};

class SpinBarrier {
 public:
  explicit SpinBarrier(int size) : size_(size) {}

  void wait() {
    if (size_ == 1) return;
    const int generation = generation_.load(std::memory_order_acquire);
    if (waiting_.fetch_add(1, std::memory_order_acq_rel) + 1 == size_) {
      waiting_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    std::chrono::steady_clock::time_point since;
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (failed_.load(std::memory_order_relaxed)) throw TeamAbandoned();
      if (spins < 2000) continue;
      std::this_thread::yield();  // more threads than cores (a test, a busy machine)
      if (spins == 2000) since = std::chrono::steady_clock::now();
      if (spins % 4096 == 0 && std::chrono::steady_clock::now() - since > kPatience) {
        fail();  // a thread never came: a defect, reported rather than waited for forever
        TORCH_CHECK(false, "a team's barrier waited ", kPatience.count(), " s for a thread that never came");
      }
    }
  }

  void fail() { failed_.store(true, std::memory_order_relaxed); }

 private:
  static constexpr std::chrono::seconds kPatience{120};
  const int size_;
  std::atomic<int> waiting_{0};
  alignas(64) std::atomic<int> generation_{0};  // the line the waiting threads spin on, apart from the arrivals'
  alignas(64) std::atomic<bool> failed_{false};
};

// One thread's view of its team: its index, the row range it owns at a step, the barrier, and the scratch in
// which the team's batch norms exchange column sums. Team() is a thread working alone.
class Team {
 public:
  Team() = default;
  Team(int size, int id, SpinBarrier& barrier, std::vector<double>& scratch)
      : size_(size), id_(id), barrier_(&barrier), scratch_(&scratch),
        per_part_(static_cast<int64_t>(scratch.size()) / (3 * size)) {}

  int size() const { return size_; }
  int id() const { return id_; }
  bool leader() const { return id_ == 0; }

  // This thread's rows [lo, hi) of a step with n rows: balanced contiguous ranges in thread order
  std::pair<int64_t, int64_t> range(int64_t n) const { return {n * id_ / size_, n * (id_ + 1) / size_}; }

  void sync() {
    if (barrier_ != nullptr) barrier_->wait();
  }

  // A loop's next step has n rows: where that differs from the step before (not at the first), the ranges move
  // and a thread may read rows another one wrote, so the team meets first
  void enter_step(int64_t n) {
    if (rows_ >= 0 && n != rows_) sync();
    rows_ = n;
  }

  // The next reduction's scratch slot (each thread counts its own; all count alike). Three slots in turn:
  // batch norm's forward reads its column sums (slot i) again after the barrier of its squares (slot i + 1),
  // while a thread already past that barrier may write the next reduction's sums (slot i + 2) before meeting
  // the others again; slot i + 3 = slot i comes only after that next barrier, which every thread reaches when
  // done reading slot i.
  int64_t next_slot() { return slot_++; }

  // The column sums of thread `part` in scratch slot `slot`, as T. Every slot and part has the same room
  // (team_scratch_size's largest count), whatever the count of the reduction: a slot's place must not move
  // with the widths of the reductions around it (BN-LSTM's norms are 4H and H wide)
  template <typename T>
  T* sums(int64_t slot, int part) const {
    return reinterpret_cast<T*>(scratch_->data() + ((slot % 3) * size_ + part) * per_part_);
  }

  // A reduction of `count` sums fits in the scratch (checked once per reduction, before its first write)
  template <typename T>
  void check_room(int64_t count) const {
    TORCH_CHECK(count * static_cast<int64_t>(sizeof(T)) <= per_part_ * 8, "team scratch too small for ", count,
                " sums");
  }

 private:
  int size_ = 1, id_ = 0;
  SpinBarrier* barrier_ = nullptr;
  std::vector<double>* scratch_ = nullptr;
  int64_t per_part_ = 0;  // doubles per slot and part
  int64_t slot_ = 0;
  int64_t rows_ = -1;  // the rows of the step entered last
};

// Scratch doubles a team of `size` needs for column sums of up to `count` values of T in each of three slots
template <typename T>
int64_t team_scratch_size(int64_t size, int64_t count) {
  return 3 * size * ((count * static_cast<int64_t>(sizeof(T)) + 7) / 8);
}

// The team size of the last loop that ran (tests read it: a team that could not be formed ran in one part)
inline std::atomic<int64_t> last_team_size{0};

// body(team) on `parts` threads at once (or, with parts 1, on the calling thread). Returns false, having run
// nothing, where OpenMP gives fewer threads than asked (already inside a parallel region, a thread limit, a build
// without OpenMP): the caller then runs with one part. The first exception a thread throws is rethrown here.
template <typename F>
bool run_team(int parts, int64_t scratch_doubles, const F& body) {
  SpinBarrier barrier(parts);
  std::vector<double> scratch(scratch_doubles);
  if (parts == 1) {
    Team team(1, 0, barrier, scratch);
    body(team);
    last_team_size = 1;
    return true;
  }
#ifndef _OPENMP
  return false;
#else
  std::exception_ptr error;
  std::mutex error_lock;
  bool formed = true;
  const at::ThreadLocalState caller;  // grad mode, dispatch keys: the operators called inside run as the caller's
  // As many threads as OpenMP's pool holds, if more than the parts: a smaller team would make libgomp end the
  // surplus threads and PyTorch's next parallel operator start them again. Threads past the parts return at once.
#pragma omp parallel num_threads(std::max(parts, omp_get_max_threads()))
  {
    const int id = omp_get_thread_num();
    if (omp_get_num_threads() < parts) {
      if (id == 0) formed = false;
    } else if (id < parts) {
      at::ThreadLocalStateGuard as_caller(caller);
      c10::ParallelGuard in_parallel(true);  // PyTorch's own parallel loops inside run on this thread
      Team team(parts, id, barrier, scratch);
      try {
        body(team);
      } catch (const TeamAbandoned&) {
      } catch (...) {
        barrier.fail();
        std::lock_guard<std::mutex> guard(error_lock);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
  if (formed) last_team_size = parts;
  return formed;
#endif
}

// body(team) on `parts` threads, or on the calling thread alone where OpenMP cannot give them
template <typename F>
void run_loop(int64_t parts, int64_t scratch_doubles, const F& body) {
  TORCH_CHECK(parts >= 1 && parts <= 256, "a loop runs in 1 to 256 parts, got ", parts);
  if (!run_team(static_cast<int>(parts), scratch_doubles, body)) run_team(1, scratch_doubles, body);
}

}  // namespace bnrhn_kernels
