// cpu_common.h: host-only helpers shared by the C++ CPU paths (nm_refine_cpu.cpp for N:M,
// unstructured_refine_cpu.cpp for unstructured): the exact fp16 row conversion and the
// row-parallel driver. Never included by CUDA sources.
#ifndef DSNOT_CPU_COMMON_H_
#define DSNOT_CPU_COMMON_H_

#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <thread>
#include <vector>

#include "dsnot_nm.h"

namespace dsnot {

// n IEEE binary16 values -> float32, exactly (F16C when the CPU has it; nm_refine_cpu.cpp).
void halves_to_floats(const uint16_t* src, float* dst, int64_t n);

constexpr int64_t kRowsPerTask = 8;  // rows handed to a thread at once (amortises the atomic)

// Runs row_fn(scratch, r) for r in [0, rows) on up to `num_threads` std::threads (<= 0: the
// hardware concurrency); each thread owns one Scratch, made by make_scratch() and reused for
// all its rows, so the per-row code allocates nothing. Returns DSNOT_OK or DSNOT_NO_MEMORY.
template <class MakeScratch, class RowFn>
int parallel_rows(int64_t rows, int num_threads, MakeScratch&& make_scratch, RowFn&& row_fn) {
  const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  if (tasks == 0) return DSNOT_OK;
  if (num_threads <= 0) num_threads = (int)std::max(1u, std::thread::hardware_concurrency());
  num_threads = (int)std::min<int64_t>(num_threads, tasks);
  std::atomic<int64_t> next{0};
  std::atomic<int> failed{DSNOT_OK};
  auto work = [&]() {
    try {
      auto scratch = make_scratch();
      for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
        const int64_t end = std::min(rows, (t + 1) * kRowsPerTask);
        for (int64_t r = t * kRowsPerTask; r < end; ++r) row_fn(scratch, r);
      }
    } catch (const std::bad_alloc&) {
      failed.store(DSNOT_NO_MEMORY);
      next.store(tasks);
    }
  };
  if (num_threads <= 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    try {
      pool.reserve(num_threads - 1);
      for (int i = 0; i < num_threads - 1; ++i) pool.emplace_back(work);
    } catch (...) {  // could not start more threads: the ones started (and this one) finish
    }
    work();
    for (auto& t : pool) t.join();
  }
  return failed.load();
}

// Unstructured refinement on the CPU (unstructured_refine_cpu.cpp); arguments already checked.
int refine_unstructured_cpu(const dsnot_nm_problem& p, const dsnot_nm_output& o, int num_threads);

}  // namespace dsnot

#endif  // DSNOT_CPU_COMMON_H_
