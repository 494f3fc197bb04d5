// SPDX-License-Identifier: Apache-2.0
#pragma once
// How finely the CPU glue splits (batch, head) items across torch's thread pool.

#include <cstdint>

namespace kvkern::cpu {

// Elementary operations (a multiply-add, a moved element) a task must do before handing part of it
// to another thread pays: about 100 us of work. ATen's GRAIN_SIZE (32768) assumes an idle pool; on
// a machine with anything else running, the caller waits at the pool's barrier for a worker the OS
// has descheduled, measured at 2-3 ms per parallel region on 2 busy cores, which made a 40 us
// scorer call take 2.3 ms.
inline constexpr int64_t kMinWorkPerTask = int64_t{1} << 18;

// Items per task so that each task does at least kMinWorkPerTask operations, given the work of
// one item; at::parallel_for runs the whole range inline when it fits in one grain.
inline int64_t grain_for(int64_t work_per_item) {
  if (work_per_item < 1) work_per_item = 1;
  const int64_t grain = kMinWorkPerTask / work_per_item;
  return grain < 1 ? 1 : grain;
}

}  // namespace kvkern::cpu
