// Contiguous slices of [0, n) on std::threads, shared by the row kernel and the bf16 GEMM.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace fdiv_cpu {

// run(begin, end) over `workers` contiguous slices of [0, n); the caller's thread takes the first.
template <typename Run>
void run_slices(int64_t workers, int64_t n, Run run) {
  workers = std::max<int64_t>(1, std::min(workers, n));
  const int64_t per = (n + workers - 1) / workers;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers; ++t) {
    const int64_t b = t * per, e = std::min(n, b + per);
    if (b < e) pool.emplace_back(run, b, e);
  }
  run(int64_t{0}, std::min(n, per));
  for (auto& th : pool) th.join();
}

}  // namespace fdiv_cpu
