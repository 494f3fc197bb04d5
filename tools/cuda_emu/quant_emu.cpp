// SPDX-License-Identifier: Apache-2.0
// CPU emulator for kvkern's CUDA quantized-KV kernels (csrc/include/kvkern/
// quant_kv.cuh), built as a shared library that tests/test_cuda_quant_kernels.py
// drives through ctypes (tools/cuda_emu/quant_emu.py). No GPU needed.
//
// The runtime (fibers, barriers, warp collectives, shared-memory poisoning and
// guard pages, read checks on __ldg, random block order) is the one of
// tools/cuda_emu/eviction_emu.cpp, copied here so neither file depends on the
// other. What runs is the real code: the run_* launch sequences of
// quant_kv.cuh (argument checks, split planning, dispatch) and every kernel
// they launch, compiled for the host by g++ from the emulation copy of the
// headers (tools/cuda_emu/gen.py). Only quant_inst.cu's QuantCudaLauncher
// (the <<<>>> line) is replaced by EmuLauncher, __fdiv_rn by the host's
// (correctly rounded) IEEE division and __syncwarp by nothing.
// Not emulated: the device math library (host exp2f / log2f / expf here), the
// memory model beyond barriers, occupancy, timing.
#include <cxxabi.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define KVKERN_EXPORT extern "C" __attribute__((visibility("default")))

// ===========================================================================
// The runtime's interface and the CUDA builtins the kernels use, on the host.
// ===========================================================================
namespace kvkern_emu {
void violation(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
bool check_read(const void* p, size_t n, const char* what);
void cp_async(void* dst, const void* src, int n);  // the hooks gen.py puts into common.cuh
void commit();
void wait(int n);
void syncthreads();
// All 32 lanes of the calling warp deposit `bytes` bytes; returns the 32
// deposits (valid until the warp's next collective but one).
const unsigned char* warp_exchange(const void* mine, size_t bytes, int tag);
void mma_16816(bool bf16, float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
               uint32_t b1);
}  // namespace kvkern_emu

#define __launch_bounds__(...)
#define KVKERN_CUDA_EMULATION 1

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu_builtins {
enum Tag { kShfl = 1, kShflUp, kShflXor, kBallot, kMma };
template <typename V>
inline V shfl_generic(unsigned mask, V v, int tag, int (*src_of)(int lane, int arg), int arg, bool keep_own) {
  static_assert(sizeof(V) == 4, "32-bit shuffles");
  if (mask != 0xffffffffu) kvkern_emu::violation("warp shuffle with mask %#x (only the full mask is emulated)", mask);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const unsigned char* all = kvkern_emu::warp_exchange(&v, sizeof(V), tag);
  const int src = src_of(lane, arg);
  if (keep_own && (src < 0 || src > 31)) return v;
  V out;
  std::memcpy(&out, all + (src & 31) * sizeof(V), sizeof(V));
  return out;
}
inline int src_idx(int, int arg) { return arg & 31; }
inline int src_up(int lane, int arg) { return lane - arg; }
inline int src_xor(int lane, int arg) { return lane ^ arg; }
}  // namespace emu_builtins

template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
  if (width != 32) kvkern_emu::violation("__shfl_sync with width %d", width);
  return emu_builtins::shfl_generic(mask, v, emu_builtins::kShfl, emu_builtins::src_idx, src, false);
}
template <typename V>
inline V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
  if (width != 32) kvkern_emu::violation("__shfl_up_sync with width %d", width);
  return emu_builtins::shfl_generic(mask, v, emu_builtins::kShflUp, emu_builtins::src_up, static_cast<int>(delta), true);
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  if (width != 32) kvkern_emu::violation("__shfl_xor_sync with width %d", width);
  return emu_builtins::shfl_generic(mask, v, emu_builtins::kShflXor, emu_builtins::src_xor, lane_mask, false);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) kvkern_emu::violation("__ballot_sync with mask %#x", mask);
  const int p = pred ? 1 : 0;
  const unsigned char* all = kvkern_emu::warp_exchange(&p, sizeof(p), emu_builtins::kBallot);
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
inline float __fdiv_rn(float a, float b) { return a / b; }  // host IEEE division is correctly rounded
inline void __syncwarp(unsigned = 0xffffffffu) {}  // fibers switch only at collectives: nothing to order
#include <kvkern/quant_kv.cuh>
// The FP8 cache's kernels (fp8_kv.cuh) run on the same runtime; cuda_fp8.h's
// conversions take their host (software, round-to-nearest-even) paths here.
#include <kvkern/fp8_kv.cuh>

namespace kvkern::fp8_detail {
// fp8_decode_kernel's `extern __shared__` (only its final merge uses it; it
// writes every word it reads after a barrier, so it is not poisoned per block).
alignas(4096) unsigned char smem[1u << 16];
}  // namespace kvkern::fp8_detail

namespace kvkern::quant_detail {
// The kernels' `extern __shared__ unsigned char smem[]`: page aligned, so the
// pages past a launch's size can be made inaccessible.
constexpr size_t kSmemCapacity = 1u << 20;
alignas(4096) unsigned char smem[kSmemCapacity + 4096];
}  // namespace kvkern::quant_detail

namespace kvkern_emu {
using kvkern::quant_detail::kSmemCapacity;
using kvkern::quant_detail::smem;

// ---------------------------------------------------------------------------
// Violations and readable memory.
// ---------------------------------------------------------------------------
std::vector<std::string> g_problems;
long g_problem_count = 0;
void park_for_good();

void violation(const char* fmt, ...) {
  ++g_problem_count;
  if (g_problems.size() < 6) {
    char buf[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    g_problems.emplace_back(buf);
  }
  if (g_problem_count >= 64) park_for_good();
}

struct Range {
  const unsigned char* base;
  size_t bytes;
};
std::vector<Range> g_readable;
bool g_check_reads = false;

bool check_read(const void* p, size_t n, const char* what) {
  if (!g_check_reads) return true;
  const auto* a = static_cast<const unsigned char*>(p);
  for (const Range& r : g_readable)
    if (a >= r.base && a + n <= r.base + r.bytes) return true;
  violation("%s of %zu bytes at %p: outside every registered buffer", what, n, p);
  return false;
}

// ---------------------------------------------------------------------------
// Fibers (x86-64: a hand-written stack switch).
// ---------------------------------------------------------------------------
extern "C" void kvkern_quant_emu_switch(void** save_sp, void* to_sp);
asm(R"(
  .text
  .globl kvkern_quant_emu_switch
  .hidden kvkern_quant_emu_switch
  .type kvkern_quant_emu_switch, @function
kvkern_quant_emu_switch:
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
  .size kvkern_quant_emu_switch, .-kvkern_quant_emu_switch
)");

enum FiberState { kRunnable, kAtBarrier, kAtWarp, kDone, kAbandoned };

struct Copy {
  void* dst;
  const void* src;
  int n;
};

struct Fiber {
  void* sp = nullptr;
  unsigned char* stack = nullptr;
  FiberState state = kRunnable;
  int tag = 0;
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> groups;
};

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSlotBytes = 64;

struct Block {
  int n = 0, cur = -1, done = 0;
  std::vector<Fiber> fibers;
  std::vector<int> runnable, barrier;
  std::vector<int> warp_wait[kMaxThreads / 32];
  unsigned warp_gen[kMaxThreads / 32] = {};
  int warp_tag[kMaxThreads / 32] = {};
  size_t warp_bytes[kMaxThreads / 32] = {};
  unsigned char warp_slot[kMaxThreads / 32][2][32 * kSlotBytes];
  void* sched_sp = nullptr;
  std::function<void()> body;
  bool deferred = true, abandoned = false;
  std::mt19937_64 rng;
};
Block g_block;

void to_scheduler() { kvkern_quant_emu_switch(&g_block.fibers[g_block.cur].sp, g_block.sched_sp); }

void park_for_good() {
  if (g_block.cur < 0) return;
  g_block.abandoned = true;
  g_block.fibers[g_block.cur].state = kAbandoned;
  to_scheduler();
  std::abort();
}

[[noreturn]] void fiber_main() {
  g_block.body();
  g_block.fibers[g_block.cur].state = kDone;
  ++g_block.done;
  to_scheduler();
  std::abort();
}

void init_stacks() {
  static bool done = false;
  if (done) return;
  done = true;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t each = kStackBytes + page;
  auto* base = static_cast<unsigned char*>(
      mmap(nullptr, each * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (base == MAP_FAILED) {
    perror("quant_emu: mmap of the fiber stacks");
    std::abort();
  }
  g_block.fibers.resize(kMaxThreads);
  for (int i = 0; i < kMaxThreads; ++i) {
    unsigned char* s = base + i * each;
    mprotect(s, page, PROT_NONE);
    g_block.fibers[i].stack = s + page;
  }
}

void start_fiber(Fiber& f) {
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;
  f.sp = &top[-8];
}

char g_running[300] = "(nothing)";

// Runs one block; false when it deadlocked or was abandoned.
bool run_block(int n, const std::function<void()>& body, bool deferred, uint64_t seed) {
  init_stacks();
  if (n < 1 || n > kMaxThreads || n % 32 != 0) {
    violation("block of %d threads (the emulator needs whole warps, <= 1024)", n);
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
  for (int w = 0; w < n / 32; ++w) {
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
      g_problems.push_back(std::string("block abandoned after too many violations in ") + g_running);
      return false;
    }
    if (b.runnable.empty()) {
      int counts[5] = {}, first[5] = {-1, -1, -1, -1, -1};
      for (int i = 0; i < n; ++i) {
        const int s = b.fibers[i].state;
        if (counts[s]++ == 0) first[s] = i;
      }
      static const char* names[5] = {"runnable", "at __syncthreads", "at a warp collective", "exited", "abandoned"};
      std::string msg;
      for (int s = 0; s < 5; ++s)
        if (counts[s]) msg += std::to_string(counts[s]) + " " + names[s] + " (first " + std::to_string(first[s]) + "); ";
      violation("deadlock in %s, block %u: %s", g_running, blockIdx.x, msg.c_str());
      return false;
    }
    const size_t k = b.rng() % b.runnable.size();
    const int id = b.runnable[k];
    b.runnable[k] = b.runnable.back();
    b.runnable.pop_back();
    b.cur = id;
    threadIdx = dim3(static_cast<unsigned>(id), 0, 0);
    kvkern_quant_emu_switch(&b.sched_sp, b.fibers[id].sp);
    b.cur = -1;
  }
  for (int i = 0; i < n; ++i)
    if (!b.fibers[i].open.empty() || !b.fibers[i].groups.empty()) {
      violation("%s: thread %d of block %u exited with cp.async copies pending", g_running, i, blockIdx.x);
      break;
    }
  return true;
}

void syncthreads() {
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

const unsigned char* warp_exchange(const void* mine, size_t bytes, int tag) {
  Block& b = g_block;
  const int w = b.cur / 32, lane = b.cur % 32;
  if (bytes > kSlotBytes) violation("warp exchange of %zu bytes", bytes);
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
  // Compact the 32 deposits into a per-lane scratch copy for the caller.
  thread_local unsigned char out[32 * kSlotBytes];
  for (int l = 0; l < 32; ++l) std::memcpy(out + l * bytes, &b.warp_slot[w][parity][l * kSlotBytes], bytes);
  return out;
}

float bf16_lo(uint32_t w, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(w & 0xffffu);
  if (bf16) return __uint_as_float(static_cast<uint32_t>(h) << 16);
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}
float bf16_hi(uint32_t w, bool bf16) { return bf16_lo(w >> 16, bf16); }

void mma_16816(bool bf16, float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
               uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  const unsigned char* all = warp_exchange(mine, sizeof(mine), emu_builtins::kMma);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    uint32_t r[6];
    std::memcpy(r, all + l * sizeof(mine), sizeof(mine));
    const int g = l >> 2, q = l & 3;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
    for (int k = 0; k < 4; ++k) {
      A[rows[k]][cols[k]] = bf16_lo(r[k], bf16);
      A[rows[k]][cols[k] + 1] = bf16_hi(r[k], bf16);
    }
    B[2 * q][g] = bf16_lo(r[4], bf16);
    B[2 * q + 1][g] = bf16_hi(r[4], bf16);
    B[2 * q + 8][g] = bf16_lo(r[5], bf16);
    B[2 * q + 9][g] = bf16_hi(r[5], bf16);
  }
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int g = lane >> 2, q = lane & 3;
  const int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * q, 2 * q + 1, 2 * q, 2 * q + 1};
  for (int e = 0; e < 4; ++e) {
    double s = 0;
    for (int k = 0; k < 16; ++k) s += static_cast<double>(A[rr[e]][k]) * B[k][cc[e]];
    c[e] = static_cast<float>(static_cast<double>(c[e]) + s);
  }
}

void cp_async(void* dst, const void* src, int n) {
  Block& b = g_block;
  auto* d = static_cast<unsigned char*>(dst);
  if (d < smem || d + n > smem + kSmemCapacity) {
    violation("%s: cp.async destination %p outside shared memory", g_running, dst);
    return;
  }
  if (reinterpret_cast<uintptr_t>(dst) % n || reinterpret_cast<uintptr_t>(src) % n)
    violation("%s: misaligned %d-byte cp.async (dst byte %zu, src %p)", g_running, n, static_cast<size_t>(d - smem), src);
  if (!check_read(src, n, "cp.async")) {
    std::memset(dst, 0xff, n);
    return;
  }
  if (b.deferred) {
    std::memset(dst, 0xff, n);
    b.fibers[b.cur].open.push_back({dst, src, n});
  } else {
    std::memcpy(dst, src, n);
  }
}

void commit() {
  Fiber& f = g_block.fibers[g_block.cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void wait(int n) {
  Fiber& f = g_block.fibers[g_block.cur];
  const size_t keep = static_cast<size_t>(std::max(n, 0));
  if (f.groups.size() <= keep) return;
  const size_t retire = f.groups.size() - keep;
  for (size_t g = 0; g < retire; ++g)
    for (const Copy& c : f.groups[g]) std::memcpy(c.dst, c.src, c.n);
  f.groups.erase(f.groups.begin(), f.groups.begin() + static_cast<std::ptrdiff_t>(retire));
}

void crash_handler(int sig) {
  char buf[500];
  const int len = snprintf(buf, sizeof(buf),
                           "\nquant_emu CRASH: signal %d in %s (a wild access: shared memory past the launch's "
                           "size, a bad global pointer, or a fiber stack overflow)\n",
                           sig, g_running);
  if (len > 0) {
    ssize_t ignored = write(2, buf, static_cast<size_t>(std::min<int>(len, sizeof(buf) - 1)));
    (void)ignored;
  }
  _exit(3);
}

void install_crash_handler() {
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
}

// ---------------------------------------------------------------------------
// The launcher the run_* sequences call.
// ---------------------------------------------------------------------------
struct Options {
  int64_t seed = 1;
  bool deferred = true;
  bool check_reads = true;
  // Blocks run one after the other: 0 in blockIdx order, 1 reversed, 2 in a
  // random (seeded) order, which exposes a block reading what another block
  // of the same launch writes.
  int block_order = 2;
};

struct LaunchRecord {
  std::string kernel;
  int64_t blocks;
  int threads;
  size_t smem;
};
std::vector<LaunchRecord> g_launches;

// The kernel's (demangled) name, for messages.
std::string kernel_name(const void* fn) {
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
  size_t smem_limit;
  Options opt;

  size_t max_smem() const { return smem_limit; }

  template <typename P>
  cudaError_t operator()(void (*kernel)(P), int64_t blocks, int threads, size_t smem_bytes, const P& params) {
    if (blocks <= 0) return cudaSuccess;
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    if (smem_bytes > smem_limit || smem_bytes > kSmemCapacity) return cudaErrorInvalidValue;
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
      if (used < kSmemCapacity) mprotect(smem + used, kSmemCapacity - used, PROT_NONE);
      blockIdx = dim3(static_cast<unsigned>(bid), 0, 0);
      P local = params;
      alive = run_block(threads, [&] { kernel(local); }, opt.deferred,
                        static_cast<uint64_t>(opt.seed) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(bid));
      if (used < kSmemCapacity) mprotect(smem + used, kSmemCapacity - used, PROT_READ | PROT_WRITE);
      for (size_t i = 0; i < tail; ++i)
        if (smem[smem_bytes + i] != 0xa5) {
          violation("%s wrote shared memory past the launch's %zu bytes", g_running, smem_bytes);
          break;
        }
    }
    return alive ? cudaSuccess : cudaErrorLaunchFailure;
  }
};

}  // namespace kvkern_emu

// ===========================================================================
// C API: parameter structs filled by field name, then one run.
// ===========================================================================
namespace {
using namespace kvkern;

enum Kind { kPtr, kI64, kI32, kF32, kBool };
struct Field {
  const char* name;
  size_t off;
  Kind kind;
};
template <typename T>
constexpr Kind kind_of() {
  if constexpr (std::is_pointer_v<T>) return kPtr;
  else if constexpr (std::is_same_v<T, int64_t>) return kI64;
  else if constexpr (std::is_same_v<T, float>) return kF32;
  else if constexpr (std::is_same_v<T, bool>) return kBool;
  else return kI32;
}
// The tools/cuda_emu/quant_emu.py names: a tensor ref X is "X" (its data),
// "X_sb" / "X_sh" / "X_sr" (strides over b, h, rows); the means' rows are
// stride[1] ("X_sr"); append's k_new / v_new are k_in / v_in.
#define FLD(n) Field{#n, offsetof(QuantKVParams, n), kind_of<std::remove_cv_t<decltype(QuantKVParams::n)>>()}
#define FLD_AS(name, n) Field{name, offsetof(QuantKVParams, n), kind_of<std::remove_cv_t<decltype(QuantKVParams::n)>>()}
constexpr size_t kRefData = offsetof(QuantTensorRef, data), kRefStride = offsetof(QuantTensorRef, stride);
#define REF_AS(name, n) Field{name, offsetof(QuantKVParams, n) + kRefData, kPtr}
#define STRIDE_AS(name, n, i) Field{name, offsetof(QuantKVParams, n) + kRefStride + (i) * sizeof(int64_t), kI64}
#define REF3(n) REF_AS(#n, n), STRIDE_AS(#n "_sb", n, 0), STRIDE_AS(#n "_sh", n, 1), STRIDE_AS(#n "_sr", n, 2)
const std::vector<Field> kFields = {
    REF3(k_codes), REF3(k_scale), REF3(k_min), REF3(v_codes), REF3(v_scale), REF3(v_min), REF3(k_res), REF3(v_res),
    REF3(k_in), REF3(v_in),
    REF_AS("k_mean", k_mean), STRIDE_AS("k_mean_sb", k_mean, 0), STRIDE_AS("k_mean_sr", k_mean, 1),
    REF_AS("v_mean", v_mean), STRIDE_AS("v_mean_sb", v_mean, 0), STRIDE_AS("v_mean_sr", v_mean, 1),
    REF_AS("k_new", k_in), STRIDE_AS("k_new_sb", k_in, 0), STRIDE_AS("k_new_sh", k_in, 1),
    REF_AS("v_new", v_in), STRIDE_AS("v_new_sb", v_in, 0), STRIDE_AS("v_new_sh", v_in, 1),
    FLD(lengths), FLD_AS("lengths_sb", lengths_stride_b), FLD_AS("lengths_sh", lengths_stride_h),
    FLD(batch), FLD(num_kv_heads), FLD(capacity), FLD(head_dim), FLD(residual), FLD(bits), FLD(group),
    FLD(q), FLD_AS("q_sb", q_stride_b), FLD_AS("q_sh", q_stride_h), FLD(num_q_heads), FLD(out), FLD(lse),
    FLD(sm_scale), FLD(num_splits), FLD_AS("seq_len", in_tokens)};
#undef REF3
#undef STRIDE_AS
#undef REF_AS
#undef FLD_AS
#undef FLD
// Fp8KVParams (fp8_params.h), the same naming.
#define FFLD(n) Field{#n, offsetof(Fp8KVParams, n), kind_of<std::remove_cv_t<decltype(Fp8KVParams::n)>>()}
#define FFLD_AS(name, n) Field{name, offsetof(Fp8KVParams, n), kind_of<std::remove_cv_t<decltype(Fp8KVParams::n)>>()}
#define FREF_AS(name, n) Field{name, offsetof(Fp8KVParams, n) + kRefData, kPtr}
#define FSTRIDE_AS(name, n, i) Field{name, offsetof(Fp8KVParams, n) + kRefStride + (i) * sizeof(int64_t), kI64}
#define FREF3(n) FREF_AS(#n, n), FSTRIDE_AS(#n "_sb", n, 0), FSTRIDE_AS(#n "_sh", n, 1), FSTRIDE_AS(#n "_sr", n, 2)
const std::vector<Field> kFp8Fields = {
    FREF3(k_fp8), FREF3(v_fp8), FREF3(k_in), FREF3(v_in), FFLD(k_scale), FFLD(v_scale), FFLD(k_scale_stride),
    FFLD(v_scale_stride), FFLD(lengths), FFLD_AS("lengths_sb", lengths_stride_b),
    FFLD_AS("lengths_sh", lengths_stride_h), FFLD(batch), FFLD(num_kv_heads), FFLD(capacity), FFLD(head_dim),
    FFLD(in_tokens), FFLD(q), FFLD_AS("q_sb", q_stride_b), FFLD_AS("q_sh", q_stride_h), FFLD(num_q_heads),
    FFLD(out), FFLD(lse), FFLD(sm_scale), FFLD(num_splits), FFLD(partial_out), FFLD(partial_lse)};
#undef FREF3
#undef FSTRIDE_AS
#undef FREF_AS
#undef FFLD_AS
#undef FFLD
#define OFLD(n) Field{#n, offsetof(kvkern_emu::Options, n), kind_of<std::remove_cv_t<decltype(kvkern_emu::Options::n)>>()}
const std::vector<Field> kOptionFields = {OFLD(seed), OFLD(deferred), OFLD(check_reads), OFLD(block_order)};
#undef OFLD

struct Handle {
  QuantKVParams p;
  Fp8KVParams f;
  bool fp8 = false;  // emu_new_fp8: the fields are Fp8KVParams'

  kvkern_emu::Options options;
  size_t smem_limit = 227 * 1024;
};

std::string g_error;

const Field* find(const std::vector<Field>& fs, const char* name) {
  for (const Field& f : fs)
    if (std::strcmp(f.name, name) == 0) return &f;
  return nullptr;
}

int set(Handle* h, const char* name, double value, void* ptr, bool is_ptr) {
  void* base = h->fp8 ? static_cast<void*>(&h->f) : static_cast<void*>(&h->p);
  const Field* f = find(h->fp8 ? kFp8Fields : kFields, name);
  if (f == nullptr && (f = find(kOptionFields, name)) != nullptr) base = &h->options;
  if (f == nullptr && std::strcmp(name, "smem_limit") == 0 && !is_ptr) {
    h->smem_limit = static_cast<size_t>(value);
    return 0;
  }
  if (f == nullptr || (f->kind == kPtr) != is_ptr) {
    g_error = std::string("no ") + (is_ptr ? "pointer" : "numeric") + " field '" + name + "'";
    return -1;
  }
  unsigned char* at = static_cast<unsigned char*>(base) + f->off;
  switch (f->kind) {
    case kPtr: std::memcpy(at, &ptr, sizeof(ptr)); break;
    case kI64: { const int64_t v = static_cast<int64_t>(value); std::memcpy(at, &v, 8); break; }
    case kI32: { const int v = static_cast<int>(value); std::memcpy(at, &v, 4); break; }
    case kF32: { const float v = static_cast<float>(value); std::memcpy(at, &v, 4); break; }
    case kBool: { const bool v = value != 0; std::memcpy(at, &v, 1); break; }
  }
  return 0;
}

int finish(cudaError_t err) {
  using kvkern_emu::g_problems;
  std::string msg;
  for (const std::string& p : g_problems) msg += p + "\n";
  if (kvkern_emu::g_problem_count > static_cast<long>(g_problems.size()))
    msg += "... and " + std::to_string(kvkern_emu::g_problem_count - static_cast<long>(g_problems.size())) + " more\n";
  if (err != cudaSuccess) msg = std::string("launch sequence returned ") + cudaGetErrorName(err) + "\n" + msg;
  g_error = msg;
  if (err == cudaErrorInvalidValue && g_problems.empty()) return 2;
  return msg.empty() ? 0 : 1;
}
}  // namespace

extern "C" const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError(other)";
  }
}

KVKERN_EXPORT void* emu_new() { return new Handle; }
KVKERN_EXPORT void* emu_new_fp8() {
  auto* h = new Handle;
  h->fp8 = true;
  return h;
}
KVKERN_EXPORT int emu_fp8_default_splits(void* hp, int num_sms) {
  return kvkern::fp8_detail::default_splits(static_cast<Handle*>(hp)->f, num_sms);
}
KVKERN_EXPORT void emu_free(void* h) { delete static_cast<Handle*>(h); }
KVKERN_EXPORT int emu_set(void* h, const char* name, double value) {
  return set(static_cast<Handle*>(h), name, value, nullptr, false);
}
KVKERN_EXPORT int emu_set_ptr(void* h, const char* name, void* ptr) {
  return set(static_cast<Handle*>(h), name, 0, ptr, true);
}
KVKERN_EXPORT void emu_allow(const void* ptr, size_t bytes) {
  kvkern_emu::g_readable.push_back({static_cast<const unsigned char*>(ptr), bytes});
}
KVKERN_EXPORT void emu_clear_allowed() { kvkern_emu::g_readable.clear(); }
KVKERN_EXPORT const char* emu_error() { return g_error.c_str(); }
KVKERN_EXPORT const char* emu_launches() {
  static std::string s;
  s.clear();
  for (const auto& l : kvkern_emu::g_launches)
    s += l.kernel + " " + std::to_string(l.blocks) + " " + std::to_string(l.threads) + " " + std::to_string(l.smem) + "\n";
  return s.c_str();
}
// The splits quant_decode_default_splits would pick (num_sms) and the workspace of S splits.
KVKERN_EXPORT int emu_default_splits(void* hp, int num_sms) {
  return kvkern::quant_detail::default_splits(static_cast<Handle*>(hp)->p, num_sms);
}
KVKERN_EXPORT long long emu_workspace_bytes(void* hp, int num_splits) {
  return static_cast<long long>(kvkern::quant_detail::attention_ws_bytes(static_cast<Handle*>(hp)->p, num_splits));
}

// op: "attention" (workspace: the split-K buffer, carved as the glue would),
// "quantize", "append"; with an emu_new_fp8 handle "fp8_attention" (partial
// buffers set as fields), "fp8_quantize", "fp8_append". 0 ok, 1 violations / failed launch, 2 refused.
KVKERN_EXPORT int emu_run(void* hp, const char* op, int dtype, void* workspace) {
  auto* h = static_cast<Handle*>(hp);
  kvkern_emu::install_crash_handler();
  kvkern_emu::g_problems.clear();
  kvkern_emu::g_problem_count = 0;
  kvkern_emu::g_launches.clear();
  kvkern_emu::g_check_reads = h->options.check_reads;
  kvkern_emu::EmuLauncher launch{h->smem_limit, h->options};
  const std::string o = op;
  const KvDtype dt = static_cast<KvDtype>(dtype);
  cudaError_t err = cudaErrorInvalidValue;
  if (o == "attention") {
    QuantKVParams p = h->p;
    kvkern::quant_detail::set_attention_ws(p, p.num_splits, workspace);
    err = kvkern::quant_detail::run_quant_decode_attention(p, dt, launch);
  } else if (o == "quantize") {
    err = kvkern::quant_detail::run_quantize_kv(h->p, dt, launch);
  } else if (o == "append") {
    err = kvkern::quant_detail::run_append_quantized_kv(h->p, dt, launch);
  } else if (o == "fp8_attention") {
    err = kvkern::fp8_detail::run_fp8_decode_attention(h->f, dt, launch);
  } else if (o == "fp8_quantize") {
    err = kvkern::fp8_detail::run_quantize_fp8_kv(h->f, dt, launch);
  } else if (o == "fp8_append") {
    err = kvkern::fp8_detail::run_append_fp8_kv(h->f, dt, launch);
  }
  return finish(err);
}
