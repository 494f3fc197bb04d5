// SPDX-License-Identifier: Apache-2.0
// The CUDA runtime the CPU emulators of kvkern's kernels share
// (tools/cuda_emu/emu.cpp: decode attention; eviction_emu.cpp: score and
// evict; quant_emu.cpp: quantized and FP8 caches). Include it before the
// kernel headers (the emulation copy tools/cuda_emu/gen.py makes): it supplies
// the CUDA built-ins the kernels call, on the host, and the machinery behind
// them. Header-only (inline definitions), so a program split into several
// translation units (emu.cpp's parallel parts) links one copy.
//
// Emulated and checked:
//  * every CUDA thread of a block is a fiber with its own stack (a guard page
//    below it); fibers switch only at __syncthreads and warp collectives
//    (shuffles, ballots, mma), the next one picked at random (seeded), so any
//    order of the threads between barriers can show;
//  * __syncthreads over the whole block and warp collectives over all 32
//    lanes, full mask only (a barrier some thread never reaches, or lanes at
//    different collectives, is reported as a deadlock / mismatch, with where
//    every thread waits);
//  * cp.async (the hooks gen.py puts into common.cuh) deferred (the
//    destination reads 0xff, NaN in every float type, until the issuing
//    thread's wait retires its group: the latest it may land) or immediate
//    (lands at issue: the earliest); misaligned copies and copies pending at
//    thread exit are reported;
//  * global reads (cp.async and __ldg sources) are checked against the
//    registered regions, optionally byte by byte (a read of a slot past the
//    length is reported and returns 0xff bytes);
//  * mma.sync m16n8k16 (fp16 / bf16 in, fp32 accumulate) from the documented
//    PTX fragment layout of the 32 lanes' registers, summed exactly in double;
//  * one page-aligned dynamic shared memory, which every kernel namespace's
//    `extern __shared__ smem[]` names. EmuLauncher (the launchers' stand-in
//    for <<<>>>) poisons it (0xff) before every block, makes the pages past
//    the launch's size inaccessible (a wild write crashes with the kernel
//    named) and checks a canary in the sub-page tail; blocks run one at a time
//    in blockIdx order, reversed or a random (seeded) order, so a block that
//    depends on another block of the same launch shows.
// Not emulated: the device's math library (host exp2f / expf / logf here), the
// memory model beyond barriers (threads interleave only at barriers and
// collectives), tensor-core rounding, occupancy, timing.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) && !defined(KVKERN_EMU_UCONTEXT)
#define KVKERN_EMU_ASM_SWITCH 1
#else
#define KVKERN_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define __launch_bounds__(...)
#define KVKERN_CUDA_EMULATION 1  // the kernels' mma.sync takes kvkern_emu::mma_16816
using std::isnan;

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace kvkern_emu {
constexpr size_t kSmemCapacity = 1u << 20;
// The one dynamic shared memory. Page-aligned so that the pages past a
// launch's size can be made inaccessible; one page more than the capacity so
// a full-size launch still has a checked tail.
alignas(4096) inline unsigned char smem[kSmemCapacity + 4096] __asm__("kvkern_emu_smem");

void violation(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
bool check_read(const void* p, size_t n, const char* what);
void syncthreads();
const unsigned char* warp_exchange(const void* mine, size_t bytes, int tag);
}  // namespace kvkern_emu

// Every kernel namespace's `extern __shared__ unsigned char smem[]` is the
// runtime's buffer (same assembler name).
namespace kvkern::decode_attention_detail { extern unsigned char smem[] __asm__("kvkern_emu_smem"); }
namespace kvkern::eviction_detail { extern unsigned char smem[] __asm__("kvkern_emu_smem"); }
namespace kvkern::quant_detail { extern unsigned char smem[] __asm__("kvkern_emu_smem"); }
namespace kvkern::fp8_detail { extern unsigned char smem[] __asm__("kvkern_emu_smem"); }

// ===========================================================================
// The CUDA built-ins the kernels use.
// ===========================================================================
namespace kvkern_emu {
enum CollectiveTag { kShfl = 1, kShflUp, kShflXor, kBallot, kMma };
template <typename V>
inline V shfl_generic(unsigned mask, V v, int tag, int src, bool keep_own_if_outside, const char* what) {
  static_assert(sizeof(V) == 4, "32-bit shuffles");
  if (mask != 0xffffffffu) violation("%s with mask %#x (only the full mask is emulated)", what, mask);
  const unsigned char* all = warp_exchange(&v, sizeof(V), tag);
  if (keep_own_if_outside && (src < 0 || src > 31)) return v;
  V out;
  std::memcpy(&out, all + (src & 31) * sizeof(V), sizeof(V));
  return out;
}
inline int lane_id() { return static_cast<int>(threadIdx.x) & 31; }
}  // namespace kvkern_emu

template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
  if (width != 32) kvkern_emu::violation("__shfl_sync with width %d (only 32 is emulated)", width);
  return kvkern_emu::shfl_generic(mask, v, kvkern_emu::kShfl, src & 31, false, "__shfl_sync");
}
template <typename V>
inline V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  if (width != 32) kvkern_emu::violation("__shfl_up_sync with width %d (only 32 is emulated)", width);
  return kvkern_emu::shfl_generic(mask, v, kvkern_emu::kShflUp, kvkern_emu::lane_id() - static_cast<int>(delta), true,
                                  "__shfl_up_sync");
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  if (width != 32) kvkern_emu::violation("__shfl_xor_sync with width %d (only 32 is emulated)", width);
  if (lane_mask < 0 || lane_mask > 31) kvkern_emu::violation("__shfl_xor_sync lane mask %d", lane_mask);
  return kvkern_emu::shfl_generic(mask, v, kvkern_emu::kShflXor, kvkern_emu::lane_id() ^ lane_mask, false,
                                  "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) kvkern_emu::violation("__ballot_sync with mask %#x", mask);
  const int p = pred ? 1 : 0;
  const unsigned char* all = kvkern_emu::warp_exchange(&p, sizeof(p), kvkern_emu::kBallot);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) {
    int x;
    std::memcpy(&x, all + l * sizeof(int), sizeof(int));
    if (x) r |= 1u << l;
  }
  return r;
}
inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz(static_cast<unsigned>(x)) + 1; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline void __syncthreads() { kvkern_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) {}  // fibers switch only at collectives: nothing to order
inline float __fdiv_rn(float a, float b) { return a / b; }  // host IEEE division is correctly rounded
// Fibers switch only at barriers and collectives, so a read-modify-write is atomic.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename V>
inline V __ldg(const V* p) {
  V v;
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V) != 0)
    kvkern_emu::violation("misaligned %zu-byte __ldg at %p", sizeof(V), static_cast<const void*>(p));
  if (kvkern_emu::check_read(p, sizeof(V), "__ldg")) std::memcpy(&v, p, sizeof(V));
  else std::memset(&v, 0xff, sizeof(V));
  return v;
}
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

namespace kvkern_emu {
// ===========================================================================
// Violations: the first few verbatim, then a count; after kMaxViolations the
// block is abandoned (a kernel that ignores a bad length would otherwise walk
// gigabytes of unreadable slots).
// ===========================================================================
struct Violations {
  long count = 0;
  std::vector<std::string> first;
};
inline Violations g_violations;
constexpr long kMaxViolations = 64;
constexpr size_t kShownViolations = 6;
inline char g_running[512] = "(nothing)";  // what runs, for messages and crash reports
void park_for_good();

inline void violation(const char* fmt, ...) {
  ++g_violations.count;
  if (g_violations.first.size() < kShownViolations) {
    char buf[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    g_violations.first.emplace_back(buf);
  }
  if (g_violations.count >= kMaxViolations) park_for_good();
}

// "...\n" per shown violation, then how many more.
inline std::string violations_text() {
  std::string msg;
  for (const std::string& v : g_violations.first) msg += v + "\n";
  const long more = g_violations.count - static_cast<long>(g_violations.first.size());
  if (more > 0) msg += "... and " + std::to_string(more) + " more violations\n";
  return msg;
}

// ===========================================================================
// Readable global memory: regions, each readable as a whole or byte by byte.
// ===========================================================================
struct Region {
  const char* name;
  const unsigned char* base;
  size_t bytes;
  std::vector<unsigned char> readable;  // per byte; empty: every byte
};
inline std::vector<const Region*> g_regions;  // what the running kernels may read
inline std::deque<Region> g_owned_regions;     // allow()'s, cleared by clear_allowed()
inline bool g_check_reads = true;

inline void allow(const void* p, size_t n, const char* name = "registered buffer") {
  g_owned_regions.push_back(Region{name, static_cast<const unsigned char*>(p), n, {}});
  g_regions.push_back(&g_owned_regions.back());
}
inline void clear_allowed() {
  g_regions.clear();
  g_owned_regions.clear();
}

inline bool check_read(const void* p, size_t n, const char* what) {
  if (!g_check_reads) return true;
  const auto* a = static_cast<const unsigned char*>(p);
  for (const Region* r : g_regions) {
    if (a < r->base || a + n > r->base + r->bytes) continue;
    if (r->readable.empty()) return true;
    const size_t off = static_cast<size_t>(a - r->base);
    for (size_t i = 0; i < n; ++i)
      if (!r->readable[off + i]) {
        violation("%s of %zu bytes at byte %zu of %s, which the kernel must not read (a slot past the length, a head "
                  "with an out-of-range length, or padding)",
                  what, n, off, r->name);
        return false;
      }
    return true;
  }
  violation("%s of %zu bytes at %p: outside every registered buffer", what, n, p);
  return false;
}

// ===========================================================================
// Fibers.
// ===========================================================================
#if KVKERN_EMU_ASM_SWITCH
// switch(save, to): pushes the callee-saved registers, stores the stack
// pointer in *save, loads `to` and pops the other fiber's registers. Weak, so
// every translation unit that includes this header may carry it.
extern "C" void kvkern_emu_switch(void** save_sp, void* to_sp);
asm(R"(
  .text
  .weak kvkern_emu_switch
  .hidden kvkern_emu_switch
  .type kvkern_emu_switch, @function
kvkern_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kvkern_emu_switch, .-kvkern_emu_switch
)");
#endif

enum FiberState { kRunnable, kAtBarrier, kAtWarp, kDone, kAbandoned };

struct Copy {
  void* dst;
  const void* src;
  int n;
};

struct Fiber {
#if KVKERN_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  unsigned char* stack = nullptr;
  FiberState state = kRunnable;
  std::vector<Copy> open;                 // issued, not committed
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSlotBytes = 64;  // the most one lane deposits at a collective (mma: 24)

struct Block {
  int n = 0, cur = -1, done = 0;
  std::vector<Fiber> fibers;
  std::vector<int> runnable, barrier;
  std::vector<int> warp_wait[kMaxThreads / 32];
  unsigned warp_gen[kMaxThreads / 32] = {};
  int warp_tag[kMaxThreads / 32] = {};
  size_t warp_bytes[kMaxThreads / 32] = {};
  // Double-buffered: a lane can deposit for the next collective only after
  // every lane of the warp reached this one, i.e. read its deposits.
  unsigned char warp_slot[kMaxThreads / 32][2][32 * kSlotBytes];
#if KVKERN_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  std::function<void()> body;
  bool deferred = true, abandoned = false;
  std::mt19937_64 rng;
};
inline Block g_block;

inline void to_scheduler() {
  Fiber& f = g_block.fibers[g_block.cur];
#if KVKERN_EMU_ASM_SWITCH
  kvkern_emu_switch(&f.sp, g_block.sched_sp);
#else
  swapcontext(&f.ctx, &g_block.sched_ctx);
#endif
}

// Called by a fiber: it never runs again, nor does any other of the block.
inline void park_for_good() {
  if (g_block.cur < 0) return;  // not inside a block
  g_block.abandoned = true;
  g_block.fibers[g_block.cur].state = kAbandoned;
  to_scheduler();
  std::abort();  // never resumed
}

[[noreturn]] inline void fiber_main() {
  g_block.body();
  g_block.fibers[g_block.cur].state = kDone;
  ++g_block.done;
  to_scheduler();
  std::abort();  // never resumed
}

inline void init_stacks() {
  static bool done = false;
  if (done) return;
  done = true;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t each = kStackBytes + page;  // a guard page below each stack
  auto* base = static_cast<unsigned char*>(
      mmap(nullptr, each * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (base == MAP_FAILED) {
    perror("cuda_emu: mmap of the fiber stacks");
    std::abort();
  }
  g_block.fibers.resize(kMaxThreads);
  for (int i = 0; i < kMaxThreads; ++i) {
    unsigned char* s = base + i * each;
    mprotect(s, page, PROT_NONE);
    g_block.fibers[i].stack = s + page;
  }
}

inline void start_fiber(Fiber& f) {
#if KVKERN_EMU_ASM_SWITCH
  // Initial frame for kvkern_emu_switch: six zero registers, then the return
  // address fiber_main, entered with rsp = 8 mod 16 as after a call.
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;
  f.sp = &top[-8];
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

// Runs one block of n threads (blockIdx, gridDim set by the caller), each
// running `body`, to completion. False when it deadlocked or was abandoned.
inline bool run_block(int n, const std::function<void()>& body, bool deferred, uint64_t seed) {
  init_stacks();
  if (n < 1 || n > kMaxThreads) {
    violation("%s: block of %d threads", g_running, n);
    return false;
  }
  Block& b = g_block;
  b.n = n;
  b.done = 0;
  b.body = body;
  b.deferred = deferred;
  b.abandoned = false;
  b.rng.seed(seed);
  b.runnable.clear();
  b.barrier.clear();
  for (int w = 0; w < (n + 31) / 32; ++w) {
    b.warp_wait[w].clear();
    b.warp_gen[w] = 0;
  }
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.state = kRunnable;
    f.open.clear();
    f.groups.clear();
    start_fiber(f);
    b.runnable.push_back(i);
  }
  blockDim = dim3(static_cast<unsigned>(n), 1, 1);
  while (b.done < n) {
    if (b.abandoned) {
      b.cur = -1;
      g_violations.first.push_back("block abandoned after " + std::to_string(kMaxViolations) + " violations in " +
                                   g_running);
      return false;
    }
    if (b.runnable.empty()) {  // nobody can go on: say where the threads are
      static const char* names[5] = {"runnable", "at __syncthreads", "at a warp collective", "exited", "abandoned"};
      int counts[5] = {}, first[5] = {-1, -1, -1, -1, -1};
      for (int i = 0; i < n; ++i) {
        const int s = b.fibers[i].state;
        if (counts[s]++ == 0) first[s] = i;
      }
      std::string msg;
      for (int s = 0; s < 5; ++s)
        if (counts[s])
          msg += std::to_string(counts[s]) + " " + names[s] + " (first: thread " + std::to_string(first[s]) + "); ";
      violation("deadlock in %s, block %u: %s(a barrier or warp collective not reached by every thread)", g_running,
                blockIdx.x, msg.c_str());
      return false;
    }
    const size_t k = b.rng() % b.runnable.size();
    const int id = b.runnable[k];
    b.runnable[k] = b.runnable.back();
    b.runnable.pop_back();
    b.cur = id;
    threadIdx = dim3(static_cast<unsigned>(id), 0, 0);
#if KVKERN_EMU_ASM_SWITCH
    kvkern_emu_switch(&b.sched_sp, b.fibers[id].sp);
#else
    swapcontext(&b.sched_ctx, &b.fibers[id].ctx);
#endif
    b.cur = -1;  // in the scheduler
  }
  for (int i = 0; i < n; ++i) {
    const Fiber& f = b.fibers[i];
    if (!f.open.empty() || !f.groups.empty()) {
      violation("%s: thread %d of block %u exited with cp.async copies pending (%zu uncommitted, %zu groups unwaited)",
                g_running, i, blockIdx.x, f.open.size(), f.groups.size());
      break;
    }
  }
  return true;
}

inline void syncthreads() {
  Block& b = g_block;
  b.fibers[b.cur].state = kAtBarrier;
  b.barrier.push_back(b.cur);
  if (static_cast<int>(b.barrier.size()) == b.n) {
    for (int i : b.barrier) {
      b.fibers[i].state = kRunnable;
      b.runnable.push_back(i);
    }
    b.barrier.clear();
  }
  to_scheduler();
}

// All 32 lanes of the calling warp deposit `bytes` bytes; returns the 32
// deposits, packed (valid until the caller's next collective).
inline const unsigned char* warp_exchange(const void* mine, size_t bytes, int tag) {
  Block& b = g_block;
  const int w = b.cur / 32, lane = b.cur % 32;
  if (bytes > kSlotBytes) violation("warp exchange of %zu bytes", bytes);
  if (b.n % 32 != 0) violation("%s: warp collective in a block of %d threads (a partial warp)", g_running, b.n);
  const unsigned parity = b.warp_gen[w] & 1u;
  if (b.warp_wait[w].empty()) {
    b.warp_tag[w] = tag;
    b.warp_bytes[w] = bytes;
  } else if (b.warp_tag[w] != tag || b.warp_bytes[w] != bytes) {
    violation("%s: lanes of warp %d meet at different collectives (tags %d and %d)", g_running, w, b.warp_tag[w], tag);
  }
  std::memcpy(&b.warp_slot[w][parity][lane * kSlotBytes], mine, std::min(bytes, kSlotBytes));
  b.fibers[b.cur].state = kAtWarp;
  b.warp_wait[w].push_back(b.cur);
  if (b.warp_wait[w].size() == 32) {
    ++b.warp_gen[w];
    for (int i : b.warp_wait[w]) {
      b.fibers[i].state = kRunnable;
      b.runnable.push_back(i);
    }
    b.warp_wait[w].clear();
  }
  to_scheduler();
  thread_local unsigned char out[32 * kSlotBytes];
  for (int l = 0; l < 32; ++l) std::memcpy(out + l * bytes, &b.warp_slot[w][parity][l * kSlotBytes], bytes);
  return out;
}

// ===========================================================================
// Tensor cores: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.
// ===========================================================================
inline float half_lo(uint32_t w, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(w & 0xffffu);
  if (bf16) return __uint_as_float(static_cast<uint32_t>(h) << 16);
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}
inline float half_hi(uint32_t w, bool bf16) { return half_lo(w >> 16, bf16); }

inline void mma_16816(bool bf16, float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                      uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  const unsigned char* all = warp_exchange(mine, sizeof(mine), kMma);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    uint32_t r[6];
    std::memcpy(r, all + l * sizeof(mine), sizeof(mine));
    const int g = l >> 2, q = l & 3;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
    for (int k = 0; k < 4; ++k) {
      A[rows[k]][cols[k]] = half_lo(r[k], bf16);
      A[rows[k]][cols[k] + 1] = half_hi(r[k], bf16);
    }
    B[2 * q][g] = half_lo(r[4], bf16);
    B[2 * q + 1][g] = half_hi(r[4], bf16);
    B[2 * q + 8][g] = half_lo(r[5], bf16);
    B[2 * q + 9][g] = half_hi(r[5], bf16);
  }
  const int g = lane_id() >> 2, q = lane_id() & 3;
  const int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
  for (int e = 0; e < 4; ++e) {
    double s = 0;
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A[rr[e]][k]) * B[k][cc[e]];
    c[e] = static_cast<float>(static_cast<double>(c[e]) + s);
  }
}

// ===========================================================================
// cp.async (gen.py's hooks in common.cuh).
// ===========================================================================
inline void cp_async(void* dst, const void* src, int n) {
  Block& b = g_block;
  auto* d = static_cast<unsigned char*>(dst);
  if (d < smem || d + n > smem + kSmemCapacity) {
    violation("%s: cp.async destination %p outside shared memory", g_running, dst);
    return;
  }
  if (reinterpret_cast<uintptr_t>(dst) % n || reinterpret_cast<uintptr_t>(src) % n)
    violation("%s: misaligned %d-byte cp.async (dst byte %zu of shared memory, src %p)", g_running, n,
              static_cast<size_t>(d - smem), src);
  if (!check_read(src, n, "cp.async")) {
    std::memset(dst, 0xff, n);
    return;
  }
  if (b.deferred) {
    std::memset(dst, 0xff, n);  // undefined until the copy lands
    b.fibers[b.cur].open.push_back({dst, src, n});
  } else {
    std::memcpy(dst, src, n);
  }
}

inline void commit() {
  Fiber& f = g_block.fibers[g_block.cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

inline void wait(int n) {
  Fiber& f = g_block.fibers[g_block.cur];
  const size_t keep = static_cast<size_t>(std::max(n, 0));
  if (f.groups.size() <= keep) return;
  const size_t retire = f.groups.size() - keep;
  for (size_t g = 0; g < retire; ++g)
    for (const Copy& c : f.groups[g]) std::memcpy(c.dst, c.src, c.n);
  f.groups.erase(f.groups.begin(), f.groups.begin() + static_cast<std::ptrdiff_t>(retire));
}

// ===========================================================================
// Crash report: a wild access (past shared memory's open pages, a bad global
// pointer, a fiber stack overflow) or a timeout (alarm) names what ran.
// ===========================================================================
inline unsigned g_timeout_s = 0;  // what alarm() was given, for the message

inline void crash_handler(int sig) {
  char buf[800];
  const int len =
      sig == SIGALRM
          ? snprintf(buf, sizeof(buf), "\nEMU TIMEOUT: %s ran for over %u s (an endless loop in the kernel?)\n",
                     g_running, g_timeout_s)
          : snprintf(buf, sizeof(buf),
                     "\nEMU CRASH: signal %d while running %s (a wild memory access by the kernel, e.g. shared "
                     "memory past the launch's size, a bad global pointer, or a fiber stack overflow)\n",
                     sig, g_running);
  if (len > 0) {
    ssize_t ignored = write(2, buf, static_cast<size_t>(std::min<int>(len, sizeof(buf) - 1)));
    (void)ignored;
  }
  _exit(3);
}

inline void install_crash_handler() {
  static bool done = false;
  if (done) return;
  done = true;
  static std::vector<char> alt(1 << 16);
  stack_t ss{};
  ss.ss_sp = alt.data();
  ss.ss_size = alt.size();
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_handler = crash_handler;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGALRM, &sa, nullptr);
}

// Shared-memory pages from `open` (page-rounded) to the capacity become
// inaccessible (open = kSmemCapacity: all accessible again).
inline void protect_smem_from(size_t open) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  open = std::min(kSmemCapacity, (open + page - 1) / page * page);
  mprotect(smem, open, PROT_READ | PROT_WRITE);
  if (open < kSmemCapacity) mprotect(smem + open, kSmemCapacity - open, PROT_NONE);
}

// ===========================================================================
// EmuLauncher: what the run_* launch sequences get instead of the CUDA
// launcher (the <<<>>> line and the shared-memory opt-in).
// ===========================================================================
struct Options {
  int64_t seed = 1;
  bool deferred = true;
  bool check_reads = true;
  // Blocks run one after the other: 0 in blockIdx order, 1 reversed, 2 in a
  // random (seeded) order, which exposes a block reading what another block
  // of the same launch writes.
  int block_order = 2;
  size_t smem_limit = 227 * 1024;  // an H100's opt-in limit
};

struct LaunchRecord {
  std::string kernel;
  int64_t blocks;
  int threads;
  size_t smem;
};
inline std::vector<LaunchRecord> g_launches;

// The kernel's (demangled) name, for messages.
inline std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) != 0 && info.dli_sname != nullptr) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = status == 0 && d != nullptr ? d : info.dli_sname;
    std::free(d);
    const size_t paren = s.find('(');
    return paren == std::string::npos ? s : s.substr(0, paren);
  }
  char buf[40];
  snprintf(buf, sizeof(buf), "kernel@%p", fn);
  return buf;
}

struct EmuLauncher {
  Options opt;

  size_t max_smem() const { return opt.smem_limit; }

  template <typename P>
  cudaError_t operator()(void (*kernel)(P), int64_t blocks, int threads, size_t smem_bytes, const P& params) {
    if (blocks <= 0) return cudaSuccess;
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    if (smem_bytes > opt.smem_limit || smem_bytes > kSmemCapacity) return cudaErrorInvalidValue;
    const std::string name = kernel_name(reinterpret_cast<const void*>(kernel));
    g_launches.push_back({name, blocks, threads, smem_bytes});
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t used = (smem_bytes + page - 1) / page * page;
    const size_t tail = used - smem_bytes;
    gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
    std::vector<int64_t> order(static_cast<size_t>(blocks));
    for (int64_t b = 0; b < blocks; ++b) order[static_cast<size_t>(b)] = opt.block_order == 1 ? blocks - 1 - b : b;
    if (opt.block_order == 2) {
      std::mt19937_64 rng(static_cast<uint64_t>(opt.seed) * 0xD1B54A32D192ED03ull + g_launches.size());
      std::shuffle(order.begin(), order.end(), rng);
    }
    bool alive = true;
    for (size_t n = 0; n < order.size() && alive; ++n) {
      const int64_t bid = order[n];
      snprintf(g_running, sizeof(g_running), "kernel(%s) block %lld of %lld", name.c_str(),
               static_cast<long long>(bid), static_cast<long long>(blocks));
      std::memset(smem, 0xff, used);
      std::memset(smem + smem_bytes, 0xa5, tail);
      protect_smem_from(used);
      blockIdx = dim3(static_cast<unsigned>(bid), 0, 0);
      P local = params;
      alive = run_block(threads, [&] { kernel(local); }, opt.deferred,
                        static_cast<uint64_t>(opt.seed) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(bid));
      protect_smem_from(kSmemCapacity);
      for (size_t i = 0; i < tail; ++i)
        if (smem[smem_bytes + i] != 0xa5) {
          violation("%s wrote shared memory past the launch's %zu bytes", g_running, smem_bytes);
          break;
        }
    }
    return alive ? cudaSuccess : cudaErrorLaunchFailure;
  }
};

// Resets what one run of a launch sequence reports.
inline void begin_run(const Options& opt) {
  install_crash_handler();
  g_violations = Violations{};
  g_launches.clear();
  g_check_reads = opt.check_reads;
}
}  // namespace kvkern_emu

// cp.async hooks are called as ::kvkern_emu::cp_async / commit / wait (gen.py).
