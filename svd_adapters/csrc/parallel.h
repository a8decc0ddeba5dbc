// svdserve::parallel_for: ATen's at::parallel_for (OpenMP build) without its lazy thread-count initialisation.
//
// That initialisation is an inline function with a thread_local "done" flag, so this library holds its own copy
// of the flag, and the first at::parallel_for here in a thread re-initialises the thread's OpenMP count from the
// process-wide default, undoing a count set for that thread (svd_adapters/threads.py gives the engine thread all
// cores and helper threads one; measured: after an adapter loader had set its own thread to one core, the engine's
// first call into these kernels put the engine on one core too, and a 1-row decode step went from 31 to 49 ms).
// Here the count is libtorch's own for the calling thread (at::get_num_threads, initialised inside libtorch).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace svdserve {

// Thread tid's share [b, e) of [0, n) when `threads` split it in contiguous, near-equal parts.
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t tid, int64_t threads) {
  const int64_t chunk = (n + threads - 1) / threads;
  return {std::min(n, tid * chunk), std::min(n, (tid + 1) * chunk)};
}

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  if (begin >= end) return;
#ifdef _OPENMP
  const int64_t numiter = end - begin;
  if (numiter > grain_size && numiter > 1 && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    std::atomic_flag failed = ATOMIC_FLAG_INIT;
    std::exception_ptr error;
#pragma omp parallel  // as many threads as this thread's count (ATen avoids a num_threads clause too)
    {
      int64_t n = omp_get_num_threads();
      if (grain_size > 0) n = std::min<int64_t>(n, (numiter + grain_size - 1) / grain_size);
      const int64_t tid = omp_get_thread_num();
      const auto [b, e] = share(numiter, tid, n);
      if (b < e) {
        try {
          at::internal::ThreadIdGuard tid_guard(static_cast<int>(tid));
          c10::ParallelGuard guard(true);
          f(begin + b, begin + e);
        } catch (...) {
          if (!failed.test_and_set()) error = std::current_exception();
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  at::internal::ThreadIdGuard tid_guard(0);
  c10::ParallelGuard guard(true);
  f(begin, end);
}

// One parallel region in which every thread runs f(tid, n) (n: the region's threads, 1 outside OpenMP) and may
// wait for the others at `barrier()`: for a kernel of several dependent passes, one region instead of one per
// pass (each region's start and end cost microseconds, comparable to a decode step's small passes). f must not
// throw (a thread that left early would leave the others waiting at a barrier): check inputs before.
template <class F>
void parallel_region(const F& f) {
#ifdef _OPENMP
  if (at::get_num_threads() > 1 && !at::in_parallel_region()) {
#pragma omp parallel
    {
      const int64_t tid = omp_get_thread_num(), n = omp_get_num_threads();
      at::internal::ThreadIdGuard tid_guard(static_cast<int>(tid));
      c10::ParallelGuard guard(true);
      f(tid, n);
    }
    return;
  }
#endif
  at::internal::ThreadIdGuard tid_guard(0);
  c10::ParallelGuard guard(true);
  f(int64_t{0}, int64_t{1});
}

// Waits for every thread of the enclosing parallel_region; `threads` is the n it gave f. With one thread there is
// nothing to wait for, and no barrier is met: one run inline from inside another OpenMP region (parallel_region's
// fallback) would bind to that region's team and wait for threads that never come.
inline void barrier(int64_t threads) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp barrier
  }
#endif
}

// Per-thread scratch buffers that only grow: a fresh allocation of a prefill's size per call costs a memset and
// page faults (measured, when it held whole folded projections: OSoRA's prefill delta ~1.7× slower in the model
// than in a loop that reused its memory). Every element used is written before it is read.
// Aligned to 64 bytes, so a packed tile's rows (core_tiles.h: TileSource) each sit in one cache line. `which` picks
// one of four buffers: one call's buffers must differ; different kernels' calls, never nested, share them.
template <typename acc_t>
acc_t* scratch(int which, int64_t n) {
  constexpr int64_t kPad = 64 / sizeof(acc_t);
  thread_local std::vector<acc_t> buffers[4];
  std::vector<acc_t>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < n + kPad) b.resize(n + kPad);
  const uintptr_t at = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<acc_t*>((at + 63) & ~uintptr_t(63));
}

}  // namespace svdserve
