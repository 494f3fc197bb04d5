// SPDX-License-Identifier: Apache-2.0
// CPU emulator for kvkern's CUDA decode-attention kernels
// (csrc/include/kvkern/decode_attention.cuh: the split kernel and the
// merge-states kernel). It runs the real kernel source, compiled for the host
// by g++, block by block, every CUDA thread of a block as a fiber, and checks
// every result against an fp64 reference. No GPU needed.
//
// Built and run by tools/cuda_emu/run.py, which first makes an emulation copy
// of the kernel headers (tools/cuda_emu/gen.py): the pre-sm_80 fallback of
// each cp.async primitive becomes a call into the runtime, and the host
// launchers (<<<>>> syntax) are cut off. The runtime (fibers, barriers,
// shuffles, cp.async, read checks, shared memory) is emu_runtime.h, shared
// with the other emulators. This file is compiled several times:
// KVKERN_EMU_PART=0 holds the cases and main(); parts
// 1..KVKERN_EMU_PARTS each instantiate a share of the kernels (compiled in
// parallel). Together they instantiate every kernel the library compiles:
// dtype {fp32, fp16, bf16} x head_dim {64, 128, 256} x heads tile {1, 2, 4, 8}
// x each (block_n, num_warps) of KVKERN_DECODE_ATTENTION_VARIANTS, and the
// merge kernel for dtype x head_dim.
//
// What is emulated and checked
//  * Threads: each thread of a block is a fiber with its own stack. It runs
//    until it reaches __syncthreads, a warp shuffle or its end; the next fiber
//    is picked at random (seeded per case, so runs are reproducible). Any
//    order of the threads between barriers can show up.
//  * __syncthreads: a barrier over every thread of the block. A barrier that
//    some thread never reaches (it exited, or waits elsewhere) is reported as
//    a deadlock, with where each thread waits.
//  * __shfl_xor_sync: full mask, width 32 only; a barrier over the warp's 32
//    lanes, then each lane reads its partner's value.
//  * cp.async, two modes bracketing when a copy may land:
//      deferred:  the destination is poisoned (0xff bytes: NaN in fp32, fp16
//                 and bf16) at issue and written when the issuing thread's
//                 cp.async.wait_group retires its group, the latest it may
//                 land: reading a tile before the wait (+ barrier) sees NaN;
//      immediate: written at issue, the earliest it may land: refilling a
//                 stage that another thread still reads shows wrong data.
//    Copies still pending (uncommitted or unwaited) at thread exit are
//    reported, and so are misaligned copies.
//  * Global reads: every cp.async and __ldg source is checked against the
//    bytes the kernel may read: q rows, and K / V rows and log_w entries of
//    valid slots only. Everything else (slots past the length, every slot of a
//    head whose length is out of range, padding of strided views) holds NaN,
//    and a read of it is reported (the read itself returns NaN bytes).
//  * Global writes: every output (out, lse, the split-K workspace) starts as
//    NaN and has canaries on both sides; the inputs must be unchanged.
//  * Shared memory: filled with 0xff before each block; a write past
//    decode_attention_smem_bytes (the host formula the launcher uses) is
//    reported (a guard region follows it; past that the pages are
//    inaccessible, so a wild access crashes with the case named).
//  * Results: out / lse against an fp64 reference computed from the same
//    (rounded) inputs, with the tolerance table of tests/utils.py (passed in by
//    run.py) plus a term for the fp32 rounding of large logits (see
//    logit_error below); NaN for out-of-range lengths; 0 / -inf for empty heads.
//
// What is NOT emulated (needs a GPU: the tests marked gpu, tools/gpu_check.py
// with compute-sanitizer)
//  * Device math: exp2f / expf / logf here are the host libm's, correctly
//    rounded or nearly; the device's (ex2.approx-based exp2f, logf) differ by
//    a few ulp. fmaf is exact on both.
//  * The memory model: no weak ordering, caches or bank conflicts; a
//    cp.async lands either at issue or at its wait, never in between; threads
//    interleave only at barriers and shuffles, not instruction by instruction,
//    so a race inside one barrier interval shows only if the random order of
//    the threads exposes it. Reads of shared memory are not bounds-checked
//    (past the host size they read NaN bytes, which poison the result).
//  * The sm_80+ code paths themselves (the inline PTX of cp.async), register
//    allocation and spills, __launch_bounds__, occupancy, launch limits, the
//    device's shared-memory limit, timing and performance.
#include "emu_runtime.h"

#include <cinttypes>
#include <climits>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef KVKERN_EMU_PART
#define KVKERN_EMU_PART 0
#endif
#ifndef KVKERN_EMU_PARTS
#define KVKERN_EMU_PARTS 1
#endif

#include <kvkern/decode_attention.cuh>

// Descriptions of the instantiated kernels. A thread function runs the body
// of one CUDA thread (the kernel call) with its argument.
namespace kvkern_emu {
using ThreadFn = void (*)(void*);
struct SplitKernel {
  kvkern::KvDtype dt;
  int D, HT, BN, NW;
  ThreadFn fn;  // arg: const DecodeAttentionParams*
};
struct MergeArgs {
  const float* partial_out;
  const float* partial_lse;
  void* out;
  float* lse;
  int64_t rows;
  int num_splits;
};
struct MergeKernel {
  kvkern::KvDtype dt;
  int D;
  ThreadFn fn;  // arg: const MergeArgs*
};
std::vector<SplitKernel>& split_registry();
std::vector<MergeKernel>& merge_registry();

// Kernel index i of the full set: dtype a, head_dim b, heads tile c, variant v.
constexpr int kNumVariants = kvkern::kNumDecodeAttentionVariants;
constexpr int kHeadDims[3] = {64, 128, 256};
constexpr int kHeadsTiles[4] = {1, 2, 4, 8};
constexpr int kNumSplitKernels = 3 * 3 * 4 * kNumVariants;
constexpr int kv_of(int i) { return i % kNumVariants; }
constexpr int kc_of(int i) { return (i / kNumVariants) % 4; }
constexpr int kb_of(int i) { return (i / (kNumVariants * 4)) % 3; }
constexpr int ka_of(int i) { return i / (kNumVariants * 12); }
}  // namespace kvkern_emu

// ===========================================================================
// Parts 1..N: kernel instantiations.
// ===========================================================================
#if KVKERN_EMU_PART > 0
namespace kvkern_emu {
namespace {
template <int A>
using DtType = std::conditional_t<A == 0, float, std::conditional_t<A == 1, __half, __nv_bfloat16>>;

template <int I>
void split_thread(void* arg) {
  constexpr auto var = kvkern::kDecodeAttentionVariants[kv_of(I)];
  kvkern::decode_attention_detail::decode_attention_split_kernel<DtType<ka_of(I)>, kHeadDims[kb_of(I)],
                                                                  kHeadsTiles[kc_of(I)], var.block_n,
                                                                  var.num_warps>(
      *static_cast<const kvkern::DecodeAttentionParams*>(arg));
}

template <int I>
void add_split(std::vector<SplitKernel>& r) {
  if constexpr (I % KVKERN_EMU_PARTS + 1 == KVKERN_EMU_PART) {
    constexpr auto var = kvkern::kDecodeAttentionVariants[kv_of(I)];
    r.push_back({kvkern::KvDtypeOf<DtType<ka_of(I)>>::value, kHeadDims[kb_of(I)], kHeadsTiles[kc_of(I)],
                 var.block_n, var.num_warps, &split_thread<I>});
  }
}

template <int M>  // M = dtype * 3 + head_dim index
void merge_thread(void* arg) {
  using T = DtType<M / 3>;
  const auto& a = *static_cast<const MergeArgs*>(arg);
  kvkern::decode_attention_detail::merge_attention_states_kernel<T, kHeadDims[M % 3]>(
      a.partial_out, a.partial_lse, static_cast<T*>(a.out), a.lse, a.rows, a.num_splits);
}

template <int M>
void add_merge(std::vector<MergeKernel>& r) {
  if constexpr (M % KVKERN_EMU_PARTS + 1 == KVKERN_EMU_PART)
    r.push_back({kvkern::KvDtypeOf<DtType<M / 3>>::value, kHeadDims[M % 3], &merge_thread<M>});
}

template <int... I>
void add_all(std::integer_sequence<int, I...>) {
  (add_split<I>(split_registry()), ...);
}
template <int... M>
void add_all_merges(std::integer_sequence<int, M...>) {
  (add_merge<M>(merge_registry()), ...);
}

const bool registered = [] {
  add_all(std::make_integer_sequence<int, kNumSplitKernels>{});
  add_all_merges(std::make_integer_sequence<int, 9>{});
  return true;
}();
}  // namespace
}  // namespace kvkern_emu
#endif  // KVKERN_EMU_PART > 0

// ===========================================================================
// Part 0: the cases, main() (the runtime: emu_runtime.h).
// ===========================================================================
#if KVKERN_EMU_PART == 0

namespace kvkern_emu {

std::vector<SplitKernel>& split_registry() {
  static std::vector<SplitKernel> r;
  return r;
}
std::vector<MergeKernel>& merge_registry() {
  static std::vector<MergeKernel> r;
  return r;
}

// ===========================================================================
// Cases.
// ===========================================================================
using kvkern::KvDtype;

const char* dt_name(KvDtype dt) {
  return dt == KvDtype::kFloat32 ? "fp32" : dt == KvDtype::kFloat16 ? "fp16" : "bf16";
}
int dt_index(KvDtype dt) { return static_cast<int>(dt); }
size_t dt_size(KvDtype dt) { return dt == KvDtype::kFloat32 ? 4 : 2; }

float load_elem(KvDtype dt, const void* base, int64_t i) {
  switch (dt) {
    case KvDtype::kFloat32: return static_cast<const float*>(base)[i];
    case KvDtype::kFloat16: return __half2float(static_cast<const __half*>(base)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
}
void store_elem(KvDtype dt, void* base, int64_t i, float v) {
  switch (dt) {
    case KvDtype::kFloat32: static_cast<float*>(base)[i] = v; break;
    case KvDtype::kFloat16: static_cast<__half*>(base)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v); break;
  }
}

struct Tol {
  double atol = -1, rtol = -1;
};
Tol g_tol[3], g_lse_tol[3];

// Logit error model. The kernel forms every logit in fp32: q * (sm_scale *
// log2 e), an 8-term fma chain per lane, a butterfly over the lanes of the
// row, + log_w * log2 e. Its absolute error grows with the magnitude of the
// terms, ~ |term| * 2^-24 each, and an error e in a logit is a relative error
// e in that slot's softmax weight. So with
//   mag_i = |sm_scale| * sum_e |q_e k_ie| + |log_w_i|     (>= |logit_i|)
//   eps_i = kLogitErrK * 2^-24 * mag_i
// the tolerance of out[d] grows by sum_i p_i eps_i |v_id - out_d| and that of
// lse by sum_i p_i eps_i (first order). For ordinary inputs (|logit| ~ 10)
// this is ~1e-6, far below the table's atol; it matters only for the
// deliberately ill-conditioned large-logit case (q x 30, log_w x 50: logits
// ~ 300), where any fp32 implementation (the CPU kernel too) is off by
// ~ 300 * 2^-24 = 2e-5 per term, the size of the fp32 tolerance itself. The
// case stays in (failing it would mean an error well beyond fp32 rounding)
// with the tolerance scaled by the logit magnitude instead of dropped.
// Calibration (fp32 large-logit case, every fp32 kernel, 31 seeds each, 2325
// runs): with the table alone 9 % fail, by up to 6x; with kLogitErrK = 1 the
// worst error is 0.67 of the tolerance; 2 leaves room for other seeds.
constexpr double kLogitErrK = 2.0;
constexpr double kU = 1.0 / 16777216.0;  // 2^-24

struct Stats {
  double worst = 0;  // max |err| / tolerance over every checked value
};

struct Buffer {
  std::unique_ptr<unsigned char, void (*)(void*)> mem{nullptr, &std::free};
  size_t bytes = 0;
  Region region;
  void alloc(const char* name, size_t n) {
    bytes = n;
    mem.reset(static_cast<unsigned char*>(std::aligned_alloc(64, (n + 63) / 64 * 64)));
    std::memset(mem.get(), 0xff, n);  // NaN in every dtype, 0xffffffff in int32
    region = Region{name, mem.get(), n, std::vector<unsigned char>(n, 0)};
  }
  unsigned char* data() const { return mem.get(); }
  void allow(const void* p, size_t n) {
    const size_t off = static_cast<size_t>(static_cast<const unsigned char*>(p) - mem.get());
    std::memset(region.readable.data() + off, 1, n);
  }
};

// ---------------------------------------------------------------------------
// Split-kernel case.
// ---------------------------------------------------------------------------
enum Layout { kContiguous = 0, kTokenMajor = 1, kPadded = 2 };
const char* layout_name(int l) {
  return l == kContiguous ? "contiguous" : l == kTokenMajor ? "token-major" : "padded/permuted";
}

struct SplitCase {
  const SplitKernel* k = nullptr;
  const MergeKernel* merge = nullptr;
  std::string name;
  int B = 2, Hkv = 2, G = 1, C = 131, S = 1, stages = 3;
  std::vector<int32_t> lengths;  // B * Hkv, may be out of range
  int layout = kContiguous;
  int log_w = 0;  // 0: none, 1: finite, 2: with -inf patterns
  float sm_scale = 0.f;  // 0: 1 / sqrt(D)
  float q_mult = 1.f, w_mult = 1.f;
  bool deferred = true;
  uint64_t seed = 0;
};

std::string describe(const SplitCase& c) {
  char buf[600];
  std::string lens;
  for (size_t i = 0; i < c.lengths.size(); ++i) lens += (i ? "," : "") + std::to_string(c.lengths[i]);
  snprintf(buf, sizeof(buf),
           "%s D=%d HT=%d block_n=%d num_warps=%d | %s | G=%d B=%d Hkv=%d C=%d lengths=[%s] num_splits=%d "
           "num_stages=%d layout=%s log_w=%s sm_scale=%g q_mult=%g w_mult=%g cp.async=%s seed=%" PRIu64,
           dt_name(c.k->dt), c.k->D, c.k->HT, c.k->BN, c.k->NW, c.name.c_str(), c.G, c.B, c.Hkv, c.C, lens.c_str(), c.S,
           c.stages, layout_name(c.layout), c.log_w == 0 ? "none" : c.log_w == 1 ? "finite" : "with -inf",
           static_cast<double>(c.sm_scale), static_cast<double>(c.q_mult), static_cast<double>(c.w_mult),
           c.deferred ? "deferred" : "immediate", c.seed);
  return buf;
}

// A strided view into a buffer: element offset and strides (elements).
struct View {
  int64_t off = 0, s0 = 0, s1 = 0, s2 = 0;
  int64_t at(int64_t i0, int64_t i1, int64_t i2 = 0) const { return off + i0 * s0 + i1 * s1 + i2 * s2; }
};

struct Outcome {
  bool ok = true;
  std::vector<std::string> problems;
  long extra = 0;  // problems not kept
  void fail(const std::string& m) {
    ok = false;
    if (problems.size() < 4) problems.push_back(m);
    else ++extra;
  }
};

constexpr int kPad = 64;          // canary elements on each side of every output
constexpr float kCanary = 512.f;  // exact in every dtype
constexpr size_t kSmemGuard = 16 * 1024;

// Pages past bytes + guard become inaccessible for this case.
void set_smem_limit(size_t bytes) { protect_smem_from(bytes + kSmemGuard); }

struct OutBuf {  // an output with canaries
  Buffer buf;
  KvDtype dt;
  int64_t n = 0;
  void alloc(const char* name, KvDtype t, int64_t elems) {
    dt = t;
    n = elems;
    buf.alloc(name, (elems + 2 * kPad) * dt_size(t));
    for (int i = 0; i < kPad; ++i) {
      store_elem(dt, buf.data(), i, kCanary);
      store_elem(dt, buf.data(), kPad + elems + i, kCanary);
    }
  }
  void* ptr() const { return buf.data() + kPad * dt_size(dt); }
  float get(int64_t i) const { return load_elem(dt, ptr(), i); }
  bool canaries_ok() const {
    for (int i = 0; i < kPad; ++i)
      if (load_elem(dt, buf.data(), i) != kCanary || load_elem(dt, buf.data(), kPad + n + i) != kCanary) return false;
    return true;
  }
};

bool close_enough(double got, double want, double tol, Stats& st) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  if (!std::isfinite(got)) return false;
  const double err = std::fabs(got - want);
  st.worst = std::max(st.worst, err / tol);
  return err <= tol;
}

std::string fmt_g(double x) {
  char b[64];
  snprintf(b, sizeof(b), "%.8g", x);
  return b;
}

Outcome run_split_case(const SplitCase& c, Stats& st) {
  Outcome res;
  const SplitKernel& k = *c.k;
  const KvDtype dt = k.dt;
  const size_t es = dt_size(dt);
  const int D = k.D, B = c.B, Hkv = c.Hkv, G = c.G, C = c.C, S = c.S, Hq = G * Hkv;
  if (kvkern::decode_attention_heads_tile(G) != k.HT) {
    res.fail("internal: G does not match the kernel's heads tile");
    return res;
  }
  if (static_cast<int>(c.lengths.size()) != B * Hkv) {
    res.fail("internal: lengths size");
    return res;
  }
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> normal;

  // Inputs and their views (see Layout). Everything starts as NaN bytes.
  Buffer qb, kb, vb, lb, wb;
  View qv, kv, vv, lv, wv;
  auto* kvb = &vb;  // the V buffer (== kb when token-major)
  switch (c.layout) {
    case kContiguous:
      qb.alloc("q", static_cast<size_t>(B) * 2 * Hq * D * es);  // q[:, ::2] of [B, 2 Hq, D]
      qv = {0, 2LL * Hq * D, 2LL * D};
      kb.alloc("k_cache", static_cast<size_t>(B) * Hkv * C * D * es);
      vb.alloc("v_cache", static_cast<size_t>(B) * Hkv * C * D * es);
      kv = vv = {0, 1LL * Hkv * C * D, 1LL * C * D, D};
      lb.alloc("lengths", static_cast<size_t>(B) * Hkv * 2 * 4);  // lengths[..., 0] of [B, Hkv, 2]
      lv = {0, 2LL * Hkv, 2};
      wb.alloc("log_w", static_cast<size_t>(B) * Hkv * (C + 3) * 4);  // [B, Hkv, C + 3][..., :C]
      wv = {0, 1LL * Hkv * (C + 3), C + 3, 1};
      break;
    case kTokenMajor:
      qb.alloc("q", static_cast<size_t>(Hq) * B * D * es);  // [Hq, B, D] permuted
      qv = {0, D, 1LL * B * D};
      kb.alloc("kv_cache", static_cast<size_t>(B) * C * 2 * Hkv * D * es);  // [B, C, 2, Hkv, D]
      kvb = &kb;
      kv = {0, 2LL * C * Hkv * D, D, 2LL * Hkv * D};
      vv = {1LL * Hkv * D, 2LL * C * Hkv * D, D, 2LL * Hkv * D};
      lb.alloc("lengths", static_cast<size_t>(Hkv) * B * 4);  // [Hkv, B] permuted
      lv = {0, 1, B};
      wb.alloc("log_w", static_cast<size_t>(Hkv) * B * C * 4);  // [Hkv, B, C] permuted
      wv = {0, C, 1LL * B * C, 1};
      break;
    default:
      qb.alloc("q", static_cast<size_t>(B) * (Hq + 3) * D * es);  // [B, Hq + 3, D][:, 1:Hq+1]
      qv = {D, 1LL * (Hq + 3) * D, D};
      kb.alloc("k_cache", static_cast<size_t>(B) * (Hkv + 1) * (C + 5) * D * es);  // [B, Hkv+1, C+5, D][:, :Hkv, 2:C+2]
      kv = {2LL * D, 1LL * (Hkv + 1) * (C + 5) * D, 1LL * (C + 5) * D, D};
      vb.alloc("v_cache", static_cast<size_t>(Hkv) * B * (C + 2) * D * es);  // [Hkv, B, C + 2, D] permuted
      vv = {0, 1LL * (C + 2) * D, 1LL * B * (C + 2) * D, D};
      lb.alloc("lengths", static_cast<size_t>(B) * Hkv * 4);
      lv = {0, Hkv, 1};
      wb.alloc("log_w", static_cast<size_t>(B) * Hkv * (C + 1) * 4);  // [B, Hkv, C + 1][..., 1:]
      wv = {1, 1LL * Hkv * (C + 1), C + 1, 1};
      break;
  }
  Buffer& vbuf = *kvb;
  auto* lens = reinterpret_cast<int32_t*>(lb.data());
  auto* w = reinterpret_cast<float*>(wb.data());
  for (size_t i = 0; i < lb.bytes / 4; ++i) lens[i] = 12345;  // padding of the strided views
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < Hkv; ++j) lens[lv.at(b, j)] = c.lengths[b * Hkv + j];
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      for (int e = 0; e < D; ++e) store_elem(dt, qb.data(), qv.at(b, h) + e, normal(rng) * c.q_mult);
      qb.allow(qb.data() + qv.at(b, h) * es, D * es);
    }
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < Hkv; ++j) {
      const int len = c.lengths[b * Hkv + j];
      const int valid = (len < 0 || len > C) ? 0 : len;
      const int pattern = (b * Hkv + j) % 4;
      for (int i = 0; i < valid; ++i) {
        const int64_t kr = kv.at(b, j, i), vr = vv.at(b, j, i);
        for (int e = 0; e < D; ++e) {
          store_elem(dt, kb.data(), kr + e, normal(rng));
          store_elem(dt, vbuf.data(), vr + e, normal(rng));
        }
        kb.allow(kb.data() + kr * es, D * es);
        vbuf.allow(vbuf.data() + vr * es, D * es);
        float x = normal(rng) * c.w_mult;
        if (c.log_w == 2) {
          // Per head: every slot -inf; every other slot; the first 3/4 (whole
          // splits -inf next to finite ones); none.
          if (pattern == 0 || (pattern == 1 && i % 2 == 0) || (pattern == 2 && i < valid * 3 / 4)) x = -INFINITY;
        }
        w[wv.at(b, j, i)] = x;
        if (c.log_w) wb.allow(&w[wv.at(b, j, i)], 4);
      }
    }
  const float scale = c.sm_scale != 0.f ? c.sm_scale : 1.f / std::sqrt(static_cast<float>(D));

  // fp64 reference (from the stored, rounded inputs) and the logit-error terms.
  const size_t rows = static_cast<size_t>(B) * Hq;
  std::vector<double> ref_out(rows * D), ref_lse(rows), tol_out(rows * D), tol_lse(rows);
  std::vector<char> ref_nan(rows, 0);
  const Tol to = g_tol[dt_index(dt)], tl = g_lse_tol[dt_index(dt)];
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int j = h / G, len = c.lengths[b * Hkv + j];
      const size_t row = static_cast<size_t>(b) * Hq + h;
      if (len < 0 || len > C) {
        ref_nan[row] = 1;
        continue;
      }
      std::vector<double> s(len), mag(len);
      double mx = -INFINITY;
      for (int i = 0; i < len; ++i) {
        double d = 0, m = 0;
        for (int e = 0; e < D; ++e) {
          const double t = static_cast<double>(load_elem(dt, qb.data(), qv.at(b, h) + e)) *
                           load_elem(dt, kb.data(), kv.at(b, j, i) + e);
          d += t;
          m += std::fabs(t);
        }
        const double wi = c.log_w ? w[wv.at(b, j, i)] : 0.0;
        s[i] = scale * d + wi;
        mag[i] = std::fabs(scale) * m + (std::isfinite(wi) ? std::fabs(wi) : 0.0);
        mx = std::max(mx, s[i]);
      }
      double sum = 0;
      if (mx != -INFINITY)
        for (int i = 0; i < len; ++i) sum += std::exp(s[i] - mx);
      const double lse = sum > 0 ? mx + std::log(sum) : -INFINITY;
      ref_lse[row] = lse;
      std::vector<double> p(len, 0.0);
      double lse_err = 0;
      if (sum > 0)
        for (int i = 0; i < len; ++i) {
          p[i] = std::exp(s[i] - lse);
          lse_err += p[i] * kLogitErrK * kU * mag[i];
        }
      tol_lse[row] = tl.atol + tl.rtol * std::fabs(lse) + lse_err;
      for (int e = 0; e < D; ++e) {
        double o = 0;
        for (int i = 0; i < len; ++i)
          if (p[i] != 0) o += p[i] * load_elem(dt, vbuf.data(), vv.at(b, j, i) + e);
        double err = 0;
        for (int i = 0; i < len; ++i)
          if (p[i] != 0)
            err += p[i] * kLogitErrK * kU * mag[i] * std::fabs(load_elem(dt, vbuf.data(), vv.at(b, j, i) + e) - o);
        ref_out[row * D + e] = o;
        tol_out[row * D + e] = to.atol + to.rtol * std::fabs(o) + err;
      }
    }

  // Outputs.
  OutBuf out, lse, pout, plse;
  out.alloc("out", dt, static_cast<int64_t>(rows) * D);
  lse.alloc("lse", KvDtype::kFloat32, static_cast<int64_t>(rows));
  if (S > 1) {
    pout.alloc("partial_out", KvDtype::kFloat32, static_cast<int64_t>(rows) * S * D);
    plse.alloc("partial_lse", KvDtype::kFloat32, static_cast<int64_t>(rows) * S);
  }
  // Copies of the inputs: the kernels must not write them.
  const std::vector<unsigned char> q0(qb.data(), qb.data() + qb.bytes), k0(kb.data(), kb.data() + kb.bytes),
      l0(lb.data(), lb.data() + lb.bytes), w0(wb.data(), wb.data() + wb.bytes);
  std::vector<unsigned char> v0;
  if (kvb != &kb) v0.assign(vb.data(), vb.data() + vb.bytes);

  kvkern::DecodeAttentionParams prm;
  prm.q = qb.data() + qv.off * es;
  prm.k = kb.data() + kv.off * es;
  prm.v = vbuf.data() + vv.off * es;
  prm.lengths = lens + lv.off;
  prm.log_w = c.log_w ? w + wv.off : nullptr;
  prm.out = out.ptr();
  prm.lse = static_cast<float*>(lse.ptr());
  prm.partial_out = S > 1 ? static_cast<float*>(pout.ptr()) : nullptr;
  prm.partial_lse = S > 1 ? static_cast<float*>(plse.ptr()) : nullptr;
  prm.batch = B;
  prm.num_q_heads = Hq;
  prm.num_kv_heads = Hkv;
  prm.capacity = C;
  prm.head_dim = D;
  prm.q_stride_b = qv.s0;
  prm.q_stride_h = qv.s1;
  prm.k_stride_b = kv.s0;
  prm.k_stride_h = kv.s1;
  prm.k_stride_c = kv.s2;
  prm.v_stride_b = vv.s0;
  prm.v_stride_h = vv.s1;
  prm.v_stride_c = vv.s2;
  prm.lengths_stride_b = lv.s0;
  prm.lengths_stride_h = lv.s1;
  prm.log_w_stride_b = wv.s0;
  prm.log_w_stride_h = wv.s1;
  prm.sm_scale = scale;
  prm.num_splits = S;
  prm.block_n = k.BN;
  prm.num_warps = k.NW;
  prm.num_stages = c.stages;

  g_violations = Violations{};
  g_regions = {&qb.region, &kb.region, &lb.region, &wb.region};
  if (kvb != &kb) g_regions.push_back(&vb.region);

  // The split kernel, block by block.
  const size_t smem_bytes = kvkern::decode_attention_smem_bytes(D, dt, G, k.BN, k.NW, c.stages);
  if (smem_bytes + kSmemGuard > kSmemCapacity) {
    res.fail("case needs " + std::to_string(smem_bytes) + " bytes of shared memory, more than the emulator holds");
    return res;
  }
  set_smem_limit(smem_bytes);
  const int64_t blocks = kvkern::decode_attention_num_blocks(prm);
  gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
  bool alive = true;
  for (int64_t bid = 0; bid < blocks && alive; ++bid) {
    std::memset(smem, 0xff, smem_bytes + kSmemGuard);
    blockIdx = dim3(static_cast<unsigned>(bid), 0, 0);
    alive = run_block(k.NW * 32, [&] { k.fn(&prm); }, c.deferred, c.seed * 7919 + static_cast<uint64_t>(bid));
    for (size_t i = smem_bytes; i < smem_bytes + kSmemGuard; ++i)
      if (smem[i] != 0xff) {
        violation("block %" PRId64 " wrote shared memory byte %zu, past decode_attention_smem_bytes = %zu", bid, i,
                  smem_bytes);
        break;
      }
  }
  // The merge, as launch_decode_attention_split does it.
  if (alive && S > 1) {
    pout.buf.allow(pout.ptr(), rows * S * D * 4);
    plse.buf.allow(plse.ptr(), rows * S * 4);
    g_regions = {&pout.buf.region, &plse.buf.region};
    MergeArgs ma{static_cast<const float*>(pout.ptr()), static_cast<const float*>(plse.ptr()), out.ptr(),
                 static_cast<float*>(lse.ptr()), static_cast<int64_t>(rows), S};
    const int rpb = kvkern::decode_attention_detail::kMergeThreads / (D / 4);
    const int64_t mblocks = (static_cast<int64_t>(rows) + rpb - 1) / rpb;
    gridDim = dim3(static_cast<unsigned>(mblocks), 1, 1);
    for (int64_t bid = 0; bid < mblocks && alive; ++bid) {
      blockIdx = dim3(static_cast<unsigned>(bid), 0, 0);
      alive = run_block(kvkern::decode_attention_detail::kMergeThreads, [&] { c.merge->fn(&ma); }, true,
                        c.seed * 104729 + static_cast<uint64_t>(bid));
    }
  }
  g_regions.clear();

  // Checks.
  for (const std::string& v : g_violations.first) res.fail(v);
  if (g_violations.count > static_cast<long>(g_violations.first.size()))
    res.fail(std::to_string(g_violations.count - static_cast<long>(g_violations.first.size())) +
             " more emulator violations");
  if (!alive) return res;
  if (!out.canaries_ok() || !lse.canaries_ok() || (S > 1 && (!pout.canaries_ok() || !plse.canaries_ok())))
    res.fail("a write before or past an output buffer (canary overwritten)");
  if (std::memcmp(q0.data(), qb.data(), qb.bytes) || std::memcmp(k0.data(), kb.data(), kb.bytes) ||
      std::memcmp(l0.data(), lb.data(), lb.bytes) || std::memcmp(w0.data(), wb.data(), wb.bytes) ||
      (kvb != &kb && std::memcmp(v0.data(), vb.data(), vb.bytes)))
    res.fail("an input buffer was modified");
  for (size_t row = 0; row < rows; ++row) {
    const std::string where = "b=" + std::to_string(row / Hq) + " h=" + std::to_string(row % Hq);
    const double gl = lse.get(static_cast<int64_t>(row));
    if (ref_nan[row]) {
      if (!std::isnan(gl)) res.fail("lse " + where + ": " + fmt_g(gl) + ", expected NaN (length out of range)");
      for (int e = 0; e < D; ++e)
        if (!std::isnan(out.get(static_cast<int64_t>(row) * D + e))) {
          res.fail("out " + where + " d=" + std::to_string(e) + ": " +
                   fmt_g(out.get(static_cast<int64_t>(row) * D + e)) + ", expected NaN (length out of range)");
          break;
        }
      continue;
    }
    if (!close_enough(gl, ref_lse[row], tol_lse[row], st))
      res.fail("lse " + where + ": " + fmt_g(gl) + ", expected " + fmt_g(ref_lse[row]) + " (tolerance " +
               fmt_g(tol_lse[row]) + ")");
    for (int e = 0; e < D; ++e) {
      const size_t i = row * D + e;
      const double go = out.get(static_cast<int64_t>(i));
      if (!close_enough(go, ref_out[i], tol_out[i], st)) {
        res.fail("out " + where + " d=" + std::to_string(e) + ": " + fmt_g(go) + ", expected " + fmt_g(ref_out[i]) +
                 " (tolerance " + fmt_g(tol_out[i]) + ")");
        break;
      }
    }
  }
  return res;
}

// ---------------------------------------------------------------------------
// Merge-kernel case (the standalone launcher's contract: any rows, lse
// optional, NaN / -inf partial states).
// ---------------------------------------------------------------------------
struct MergeCase {
  const MergeKernel* k = nullptr;
  int rows = 37, S = 5;
  float lse_scale = 1.f;
  bool with_lse = true;
  uint64_t seed = 0;
};

std::string describe(const MergeCase& c) {
  char buf[300];
  snprintf(buf, sizeof(buf), "merge %s D=%d | rows=%d num_splits=%d lse_scale=%g lse=%s seed=%" PRIu64,
           dt_name(c.k->dt), c.k->D, c.rows, c.S, static_cast<double>(c.lse_scale), c.with_lse ? "yes" : "nullptr",
           c.seed);
  return buf;
}

Outcome run_merge_case(const MergeCase& c, Stats& st) {
  Outcome res;
  const int D = c.k->D, R = c.rows, S = c.S;
  const KvDtype dt = c.k->dt;
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> normal;
  Buffer po, pl;
  po.alloc("partial_out", static_cast<size_t>(R) * S * D * 4);
  pl.alloc("partial_lse", static_cast<size_t>(R) * S * 4);
  auto* pov = reinterpret_cast<float*>(po.data());
  auto* plv = reinterpret_cast<float*>(pl.data());
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      float x = normal(rng) * c.lse_scale;
      switch (r % 7) {
        case 0: x = -INFINITY; break;                         // every split empty
        case 1: if (s == S / 2) x = NAN; break;               // a NaN split: the row is NaN
        case 2: if (s == 0) x = -INFINITY; break;             // one empty split
        case 3: if (s % 2 == 1) x = -INFINITY; break;         // every other split empty
        case 4: x = s == S - 1 ? 80.f : -80.f; break;         // one split dominates, the rest underflow
        default: break;
      }
      plv[r * S + s] = x;
      for (int e = 0; e < D; ++e) pov[(static_cast<size_t>(r) * S + s) * D + e] = normal(rng);
    }
  po.allow(po.data(), po.bytes);
  pl.allow(pl.data(), pl.bytes);
  OutBuf out, lse;
  out.alloc("out", dt, static_cast<int64_t>(R) * D);
  lse.alloc("lse", KvDtype::kFloat32, R);
  const std::vector<unsigned char> po0(po.data(), po.data() + po.bytes), pl0(pl.data(), pl.data() + pl.bytes);

  g_violations = Violations{};
  g_regions = {&po.region, &pl.region};
  MergeArgs ma{pov, plv, out.ptr(), c.with_lse ? static_cast<float*>(lse.ptr()) : nullptr, R, S};
  const int rpb = kvkern::decode_attention_detail::kMergeThreads / (D / 4);
  const int64_t blocks = (R + rpb - 1) / rpb;
  gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
  bool alive = true;
  for (int64_t bid = 0; bid < blocks && alive; ++bid) {
    blockIdx = dim3(static_cast<unsigned>(bid), 0, 0);
    alive = run_block(kvkern::decode_attention_detail::kMergeThreads, [&] { c.k->fn(&ma); }, true, c.seed + bid);
  }
  g_regions.clear();
  for (const std::string& v : g_violations.first) res.fail(v);
  if (!alive) return res;
  if (!out.canaries_ok() || !lse.canaries_ok()) res.fail("a write before or past an output buffer");
  if (std::memcmp(po0.data(), po.data(), po.bytes) || std::memcmp(pl0.data(), pl.data(), pl.bytes))
    res.fail("an input buffer was modified");
  if (!c.with_lse)
    for (int i = 0; i < R; ++i)
      if (!std::isnan(lse.get(i))) {
        res.fail("lse written although nullptr was passed");
        break;
      }
  const Tol to = g_tol[dt_index(dt)], tl = g_lse_tol[dt_index(dt)];
  for (int r = 0; r < R; ++r) {
    bool nan_row = false;
    double mx = -INFINITY;
    for (int s = 0; s < S; ++s) {
      nan_row |= std::isnan(plv[r * S + s]);
      mx = std::max(mx, static_cast<double>(plv[r * S + s]));
    }
    double want_lse, sum = 0;
    std::vector<double> wgt(S, 0.0), eps(S, 0.0);
    if (nan_row) {
      want_lse = NAN;
    } else if (mx == -INFINITY) {
      want_lse = -INFINITY;
    } else {
      for (int s = 0; s < S; ++s) sum += std::exp(plv[r * S + s] - mx);
      want_lse = mx + std::log(sum);
      for (int s = 0; s < S; ++s) {
        wgt[s] = std::exp(plv[r * S + s] - want_lse);
        // expf(lse_s - max) in fp32: error ~ |lse_s - max| * 2^-24 (see kLogitErrK).
        if (wgt[s] != 0) eps[s] = kLogitErrK * kU * (std::fabs(plv[r * S + s] - mx) + 1.0);
      }
    }
    double lse_err = 0;
    for (int s = 0; s < S; ++s) lse_err += wgt[s] * eps[s];
    if (c.with_lse && !close_enough(lse.get(r), want_lse, tl.atol + tl.rtol * std::fabs(want_lse) + lse_err, st))
      res.fail("lse row " + std::to_string(r) + ": " + fmt_g(lse.get(r)) + ", expected " + fmt_g(want_lse));
    for (int e = 0; e < D; ++e) {
      double want = 0, err = 0;
      if (nan_row) {
        want = NAN;
      } else {
        for (int s = 0; s < S; ++s)
          if (wgt[s] != 0) want += wgt[s] * pov[(static_cast<size_t>(r) * S + s) * D + e];
        for (int s = 0; s < S; ++s)
          if (wgt[s] != 0) err += wgt[s] * eps[s] * std::fabs(pov[(static_cast<size_t>(r) * S + s) * D + e] - want);
      }
      const double got = out.get(static_cast<int64_t>(r) * D + e);
      if (!close_enough(got, want, to.atol + to.rtol * std::fabs(want) + err, st)) {
        res.fail("out row " + std::to_string(r) + " d=" + std::to_string(e) + ": " + fmt_g(got) + ", expected " +
                 fmt_g(want));
        break;
      }
    }
  }
  return res;
}

// ---------------------------------------------------------------------------
// The case lists.
// ---------------------------------------------------------------------------
// Group sizes G whose heads tile is HT (G > 8: several head chunks; 3, 5,
// 12: partial tiles).
std::vector<int> groups_for(int ht) {
  switch (ht) {
    case 1: return {1};
    case 2: return {2};
    case 4: return {4, 3};
    default: return {8, 12, 5, 16};
  }
}

constexpr int kNumScenarios = 8;

// Scenario s for kernel k and group G. Lengths are per (b, j), b-major.
SplitCase scenario(int s, const SplitKernel* k, int G) {
  SplitCase c;
  c.k = k;
  c.G = G;
  const int C = 131;
  c.C = C;
  switch (s) {
    case 0:
      c.name = "mixed lengths (0, odd, full), log_w";
      c.lengths = {0, 17, 97, C};
      c.log_w = 1;
      c.S = 1;
      c.stages = 3;
      break;
    case 1:
      c.name = "token-major K/V, permuted q, 3 splits";
      c.lengths = {C, 1, 64, 100};
      c.layout = kTokenMajor;
      c.S = 3;
      c.stages = 2;
      break;
    case 2:
      c.name = "out-of-range lengths (NaN, never read), 2 splits";
      c.Hkv = 3;
      c.lengths = {-1, 20, C + 1, C, INT_MAX, INT_MIN};
      c.log_w = 1;
      c.layout = kPadded;
      c.S = 2;
      c.stages = 4;
      break;
    case 3:
      c.name = "log_w with -inf (whole heads, alternate slots, whole splits), 7 splits";
      c.Hkv = 3;
      c.lengths = {40, 77, 40, 0, C, 5};
      c.log_w = 2;
      c.S = 7;
      c.stages = 3;
      break;
    case 4:
      c.name = "large logits (q x 30, log_w x 50: ill-conditioned)";
      c.lengths = {C, 77, 5, 130};
      c.log_w = 1;
      c.q_mult = 30.f;
      c.w_mult = 50.f;
      c.sm_scale = 0.7f;
      c.S = 1;
      c.stages = 3;
      break;
    case 5:
      c.name = "negative sm_scale, padded/permuted views, 4 splits";
      c.lengths = {C, C, C, C};
      c.sm_scale = -0.25f;
      c.layout = kPadded;
      c.S = 4;
      c.stages = 2;
      break;
    case 6:
      c.name = "more splits than tiles (16)";
      c.lengths = {C, 3, 64, 1};
      c.log_w = 1;
      c.layout = kTokenMajor;
      c.S = 16;
      c.stages = 4;
      break;
    default:
      c.name = "B=3 Hkv=1 C=67, -inf log_w, 5 splits";
      c.B = 3;
      c.Hkv = 1;
      c.C = 67;
      c.lengths = {67, 33, 1};
      c.log_w = 2;
      c.layout = kPadded;
      c.S = 5;
      c.stages = 3;
      break;
  }
  return c;
}

SplitCase long_case(const SplitKernel* k, int G, int S, int stages) {
  SplitCase c;
  c.k = k;
  c.G = G;
  c.name = "long cache C=1000";
  c.C = 1000;
  c.lengths = {1000, 999, 517, 33};
  c.log_w = 1;
  c.S = S;
  c.stages = stages;
  return c;
}

SplitCase random_case(const SplitKernel* k, std::mt19937_64& rng) {
  auto pick = [&](int lo, int hi) { return lo + static_cast<int>(rng() % static_cast<uint64_t>(hi - lo + 1)); };
  SplitCase c;
  c.k = k;
  const std::vector<int> gs = groups_for(k->HT);
  c.G = gs[rng() % gs.size()];
  c.name = "random";
  c.B = pick(1, 3);
  c.Hkv = pick(1, 3);
  c.C = pick(1, 300);
  for (int i = 0; i < c.B * c.Hkv; ++i) {
    const int r = pick(0, 9);
    c.lengths.push_back(r == 0 ? 0 : r == 1 ? c.C : r == 2 ? (pick(0, 1) ? -5 : c.C + 7) : pick(1, c.C));
  }
  static const int splits[] = {1, 2, 3, 5, 8, 16, 40};
  c.S = splits[rng() % 7];
  c.stages = pick(2, 4);
  c.layout = pick(0, 2);
  c.log_w = pick(0, 2);
  c.sm_scale = pick(0, 3) == 0 ? -0.3f : 0.f;
  return c;
}

struct Item {
  bool merge = false;
  SplitCase split;
  MergeCase mcase;
};

const MergeKernel* merge_for(const SplitKernel& k) {
  for (const MergeKernel& m : merge_registry())
    if (m.dt == k.dt && m.D == k.D) return &m;
  return nullptr;
}

uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B9B3EBull + (a << 6) + (a >> 2));
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  return x ^ (x >> 29);
}

std::vector<Item> build_items(bool full, bool deferred, bool immediate) {
  std::vector<Item> items;
  const auto& ks = split_registry();
  auto add = [&](SplitCase c) {
    for (int m = 0; m < 2; ++m) {
      if ((m == 0 && !deferred) || (m == 1 && !immediate)) continue;
      Item it;
      c.deferred = m == 0;
      c.merge = merge_for(*c.k);
      // The seed depends on the case (not its position, nor the cp.async
      // mode): shards and replays agree, and both modes see the same data.
      SplitCase d = c;
      d.deferred = true;
      d.seed = 0;
      c.seed = mix(std::hash<std::string>{}(describe(d)), 1);
      it.split = c;
      items.push_back(it);
    }
  };
  for (size_t ki = 0; ki < ks.size(); ++ki) {
    const SplitKernel* k = &ks[ki];
    const std::vector<int> gs = groups_for(k->HT);
    if (full) {
      for (size_t gi = 0; gi < gs.size(); ++gi)
        for (int s = 0; s < kNumScenarios; ++s)
          // Every scenario at the first G; at the other Gs every other one.
          if (gi == 0 || (s + static_cast<int>(gi)) % 2 == 0) add(scenario(s, k, gs[gi]));
      if (ki % 4 == 0) {
        add(long_case(k, gs[0], 1, 4));
        add(long_case(k, gs.back(), 5, 3));
      }
      std::mt19937_64 rng(mix(ki, 99));
      for (int r = 0; r < 2; ++r) add(random_case(k, rng));
    } else {
      // Three scenarios per kernel, rotating, so that across the kernels every
      // scenario meets every dtype, head_dim and heads tile.
      for (int r = 0; r < 3; ++r) {
        const int s = static_cast<int>((ki * 3 + static_cast<size_t>(r)) % kNumScenarios);
        add(scenario(s, k, gs[(ki + static_cast<size_t>(r)) % gs.size()]));
      }
    }
  }
  const auto& ms = merge_registry();
  for (size_t mi = 0; mi < ms.size(); ++mi) {
    const int nsplit_full[] = {1, 2, 5, 33};
    for (int r = 0; r < (full ? 4 : 2); ++r) {
      Item it;
      it.merge = true;
      it.mcase.k = &ms[mi];
      it.mcase.S = full ? nsplit_full[r] : (r == 0 ? 3 : 33);
      it.mcase.rows = r % 2 == 0 ? 37 : 9;
      it.mcase.lse_scale = r % 2 == 0 ? 1.f : 40.f;
      it.mcase.with_lse = r != 1;
      it.mcase.seed = mix(mi, static_cast<uint64_t>(r) + 1000);
      items.push_back(it);
    }
  }
  return items;
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------
bool parse_tol(const char* s, Tol* table) {
  // name=atol,rtol
  const char* eq = std::strchr(s, '=');
  if (!eq) return false;
  const std::string name(s, eq);
  const int idx = name == "fp32" ? 0 : name == "fp16" ? 1 : name == "bf16" ? 2 : -1;
  if (idx < 0) return false;
  char* end = nullptr;
  table[idx].atol = std::strtod(eq + 1, &end);
  if (*end != ',') return false;
  table[idx].rtol = std::strtod(end + 1, &end);
  return *end == '\0';
}

int usage() {
  fprintf(stderr,
          "usage: emu (--quick | --full) [--mode deferred|immediate|both] [--shard I/N] [--only ID] [--list] "
          "[--verbose] [--case-timeout SECONDS]\n"
          "           --tol fp32=ATOL,RTOL --tol fp16=... --tol bf16=... --lse-tol fp32=... (x3)\n"
          "Run through tools/cuda_emu/run.py, which builds this and passes the tolerances of tests/utils.py.\n");
  return 2;
}

int main_impl(int argc, char** argv) {
  g_timeout_s = 300;  // seconds per case (--case-timeout)
  bool full = false, quick = false, list = false, verbose = false;
  std::string mode = "both";
  long shard = 0, nshards = 1, only = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--full") full = true;
    else if (a == "--quick") quick = true;
    else if (a == "--list") list = true;
    else if (a == "--verbose") verbose = true;
    else if (a == "--mode") {
      const char* v = next();
      if (!v) return usage();
      mode = v;
    } else if (a == "--shard") {
      const char* v = next();
      if (!v || std::sscanf(v, "%ld/%ld", &shard, &nshards) != 2 || nshards < 1 || shard < 0 || shard >= nshards)
        return usage();
    } else if (a == "--case-timeout") {
      const char* v = next();
      if (!v) return usage();
      g_timeout_s = static_cast<unsigned>(std::strtoul(v, nullptr, 10));
    } else if (a == "--only") {
      const char* v = next();
      if (!v) return usage();
      only = std::strtol(v, nullptr, 10);
    } else if (a == "--tol" || a == "--lse-tol") {
      const char* v = next();
      if (!v || !parse_tol(v, a == "--tol" ? g_tol : g_lse_tol)) return usage();
    } else {
      return usage();
    }
  }
  if (full == quick || (mode != "deferred" && mode != "immediate" && mode != "both")) return usage();
  for (int i = 0; i < 3; ++i)
    if (g_tol[i].atol < 0 || g_lse_tol[i].atol < 0) {
      fprintf(stderr, "emu: tolerances for every dtype are required (--tol / --lse-tol)\n");
      return usage();
    }
  auto key = [](const SplitKernel& k) {
    return std::make_tuple(static_cast<int>(k.dt), k.D, k.HT, k.BN, k.NW);
  };
  std::sort(split_registry().begin(), split_registry().end(),
            [&](const SplitKernel& a, const SplitKernel& b) { return key(a) < key(b); });
  std::sort(merge_registry().begin(), merge_registry().end(), [](const MergeKernel& a, const MergeKernel& b) {
    return std::make_pair(static_cast<int>(a.dt), a.D) < std::make_pair(static_cast<int>(b.dt), b.D);
  });
  if (split_registry().empty() || merge_registry().size() != 9) {
    fprintf(stderr, "emu: kernel registry incomplete (%zu split, %zu merge): a part was not linked?\n",
            split_registry().size(), merge_registry().size());
    return 2;
  }
  const std::vector<Item> items = build_items(full, mode != "immediate", mode != "deferred");
  if (list) {
    for (size_t i = 0; i < items.size(); ++i)
      printf("%zu %s\n", i, items[i].merge ? describe(items[i].mcase).c_str() : describe(items[i].split).c_str());
    return 0;
  }
  install_crash_handler();
  setvbuf(stdout, nullptr, _IOLBF, 0);
  long runs = 0, failed = 0;
  double worst = 0;
  long worst_id = -1;
  for (size_t i = 0; i < items.size(); ++i) {
    if (only >= 0 ? static_cast<long>(i) != only : static_cast<long>(i) % nshards != shard) continue;
    const Item& it = items[i];
    const std::string desc = it.merge ? describe(it.mcase) : describe(it.split);
    snprintf(g_running, sizeof(g_running), "case %zu: %s", i, desc.c_str());
    Stats cs;
    alarm(g_timeout_s);
    const Outcome o = it.merge ? run_merge_case(it.mcase, cs) : run_split_case(it.split, cs);
    alarm(0);
    ++runs;
    if (cs.worst > worst) {
      worst = cs.worst;
      worst_id = static_cast<long>(i);
    }
    if (!o.ok) {
      ++failed;
      printf("FAIL case %zu: %s\n", i, desc.c_str());
      for (const std::string& p : o.problems) printf("    %s\n", p.c_str());
      if (o.extra) printf("    ... and %ld more\n", o.extra);
    } else if (verbose) {
      printf("ok   case %zu: %s (worst error/tolerance %.3f)\n", i, desc.c_str(), cs.worst);
    }
  }
  printf("SUMMARY runs=%ld failed=%ld split_kernels=%zu merge_kernels=%zu items=%zu worst_ratio=%.4f worst_case=%ld\n",
         runs, failed, split_registry().size(), merge_registry().size(), items.size(), worst, worst_id);
  return failed ? 1 : 0;
}

}  // namespace kvkern_emu

int main(int argc, char** argv) { return kvkern_emu::main_impl(argc, argv); }

#endif  // KVKERN_EMU_PART == 0
