// SPDX-License-Identifier: Apache-2.0
// CPU emulator for kvkern's CUDA quantized-KV kernels (csrc/include/kvkern/
// quant_kv.cuh) and FP8-cache kernels (fp8_kv.cuh), built as a shared library
// that tests/test_cuda_quant_kernels.py drives through ctypes
// (tools/cuda_emu/quant_emu.py). No GPU needed.
//
// What runs is the real code: the run_* launch sequences of quant_kv.cuh and
// fp8_kv.cuh (argument checks, split planning, dispatch) and every kernel they
// launch, compiled for the host by g++ from the emulation copy of the headers
// (tools/cuda_emu/gen.py), on the shared runtime (emu_runtime.h: fibers,
// barriers, warp collectives, read checks, shared-memory poisoning and guard
// pages, random block order). Only the CUDA launchers (the <<<>>> line) are
// replaced by kvkern_emu::EmuLauncher; cuda_fp8.h's conversions take their
// host (software, round-to-nearest-even) paths. This file holds the C API:
// the parameter structs' fields by name and the entry points.
#include "emu_runtime.h"

#include <kvkern/quant_kv.cuh>
// after quant_kv.cuh, as in the original build order
#include <kvkern/fp8_kv.cuh>

#include "emu_capi.h"

namespace {
using namespace kvkern;
using kvkern_emu::Field;
using kvkern_emu::kPtr;
using kvkern_emu::kI64;

// The tools/cuda_emu/quant_emu.py names: a tensor ref X is "X" (its data),
// "X_sb" / "X_sh" / "X_sr" (strides over b, h, rows); the means' rows are
// stride[1] ("X_sr"); append's k_new / v_new are k_in / v_in. QuantKVParams
// (quant_params.h) and Fp8KVParams (fp8_params.h) share the naming.
constexpr size_t kRefData = offsetof(QuantTensorRef, data), kRefStride = offsetof(QuantTensorRef, stride);
#define FLD_AS(S, name, n) KVKERN_EMU_FIELD_AS(S, name, n)
#define REF_AS(S, name, n) Field{name, offsetof(S, n) + kRefData, kPtr}
#define STRIDE_AS(S, name, n, i) Field{name, offsetof(S, n) + kRefStride + (i) * sizeof(int64_t), kI64}
#define REF3(S, n) \
  REF_AS(S, #n, n), STRIDE_AS(S, #n "_sb", n, 0), STRIDE_AS(S, #n "_sh", n, 1), STRIDE_AS(S, #n "_sr", n, 2)
// The b / h strides of lengths and q, named alike in both structs.
#define STRIDES_BH(S)                                                             \
  FLD_AS(S, "lengths_sb", lengths_stride_b), FLD_AS(S, "lengths_sh", lengths_stride_h), \
      FLD_AS(S, "q_sb", q_stride_b), FLD_AS(S, "q_sh", q_stride_h)
const std::vector<Field> kFields = {
    REF3(QuantKVParams, k_codes), REF3(QuantKVParams, k_scale), REF3(QuantKVParams, k_min),
    REF3(QuantKVParams, v_codes), REF3(QuantKVParams, v_scale), REF3(QuantKVParams, v_min),
    REF3(QuantKVParams, k_res), REF3(QuantKVParams, v_res), REF3(QuantKVParams, k_in), REF3(QuantKVParams, v_in),
    REF_AS(QuantKVParams, "k_mean", k_mean), STRIDE_AS(QuantKVParams, "k_mean_sb", k_mean, 0),
    STRIDE_AS(QuantKVParams, "k_mean_sr", k_mean, 1), REF_AS(QuantKVParams, "v_mean", v_mean),
    STRIDE_AS(QuantKVParams, "v_mean_sb", v_mean, 0), STRIDE_AS(QuantKVParams, "v_mean_sr", v_mean, 1),
    REF_AS(QuantKVParams, "k_new", k_in), STRIDE_AS(QuantKVParams, "k_new_sb", k_in, 0),
    STRIDE_AS(QuantKVParams, "k_new_sh", k_in, 1), REF_AS(QuantKVParams, "v_new", v_in),
    STRIDE_AS(QuantKVParams, "v_new_sb", v_in, 0), STRIDE_AS(QuantKVParams, "v_new_sh", v_in, 1),
    STRIDES_BH(QuantKVParams), FLD_AS(QuantKVParams, "seq_len", in_tokens),
    KVKERN_EMU_FIELDS(QuantKVParams, lengths, batch, num_kv_heads, capacity, head_dim, residual, bits, group, q,
                      num_q_heads, out, lse, sm_scale, num_splits, kernel_variant, dtype)};
const std::vector<Field> kFp8Fields = {
    REF3(Fp8KVParams, k_fp8), REF3(Fp8KVParams, v_fp8), REF3(Fp8KVParams, k_in), REF3(Fp8KVParams, v_in),
    STRIDES_BH(Fp8KVParams),
    KVKERN_EMU_FIELDS(Fp8KVParams, k_scale, v_scale, k_scale_stride, v_scale_stride, lengths, batch, num_kv_heads,
                      capacity, head_dim, in_tokens, q, num_q_heads, out, lse, sm_scale, num_splits, partial_out,
                      partial_lse)};
#undef STRIDES_BH
#undef REF3
#undef STRIDE_AS
#undef REF_AS
#undef FLD_AS

struct Handle {
  QuantKVParams p;
  Fp8KVParams f;
  bool fp8 = false;  // emu_new_fp8: the fields are Fp8KVParams'
  kvkern_emu::Options options;

  int set(const char* name, double value, void* ptr, bool is_ptr) {
    if (fp8)
      return kvkern_emu::set_field({{&kFp8Fields, &f}, {&kvkern_emu::kOptionFields, &options}}, name, value, ptr,
                                   is_ptr, "Fp8KVParams");
    return kvkern_emu::set_field({{&kFields, &p}, {&kvkern_emu::kOptionFields, &options}}, name, value, ptr, is_ptr,
                                 "QuantKVParams");
  }
};
}  // namespace

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
  return static_cast<Handle*>(h)->set(name, value, nullptr, false);
}
KVKERN_EXPORT int emu_set_ptr(void* h, const char* name, void* ptr) {
  return static_cast<Handle*>(h)->set(name, 0, ptr, true);
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
  kvkern_emu::begin_run(h->options);
  kvkern_emu::EmuLauncher launch{h->options};
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
  return kvkern_emu::finish(err);
}
