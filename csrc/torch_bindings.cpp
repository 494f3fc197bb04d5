// SPDX-License-Identifier: Apache-2.0
// Every kvkern op's schema, defined once. Backends register kernels elsewhere:
// csrc/cpu/*.cpp and csrc/cuda/*.cpp with STABLE_TORCH_LIBRARY_IMPL, and the
// Triton launchers from Python (kvkern/triton/__init__.py). Nothing here knows
// any math.
//
// NOTE: kvkern targets the LibTorch stable ABI (TORCH_TARGET_VERSION, set by
// the build), so one binary serves every torch >= 2.11 and the CUDA glue
// compiles against a CPU-only torch on machines without a GPU.

#include <torch/csrc/stable/library.h>

#include <string>

STABLE_TORCH_LIBRARY(kvkern, m) {
  // Single-token decode attention over a static-capacity cache with per-(batch,
  // kv-head) lengths and an optional additive logit bias per slot.
  //   q [B, Hq, D], k_cache / v_cache [B, Hkv, C, D], lengths [B, Hkv] int32,
  //   log_w [B, Hkv, C] fp32 or None. Returns out [B, Hq, D] (q's dtype) and
  //   lse [B, Hq] fp32 (natural log-sum-exp of the biased, scaled logits).
  // Config: num_splits (split-K factor), block_n (slots per tile), num_warps,
  // num_stages; 0 means "the kernel's own heuristic".
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, "
      "Tensor? log_w=None, float? sm_scale=None, int num_splits=0, int block_n=0, "
      "int num_warps=0, int num_stages=0) -> (Tensor, Tensor)");
  // The same op computed by the Triton kernel (kernel registered from Python).
  m.def(
      "decode_attention_triton(Tensor q, Tensor k_cache, Tensor v_cache, Tensor lengths, "
      "Tensor? log_w=None, float? sm_scale=None, int num_splits=0, int block_n=0, "
      "int num_warps=0, int num_stages=0) -> (Tensor, Tensor)");

  // ---- score-and-evict (kvkern/reference.py holds the exact semantics) ----
  // Every scorer returns fp32 scores [B, Hkv, C], 0 past lengths; higher = keep.
  // Each op X has a twin X_triton with the same schema (kernel registered from Python).
  const char* eviction_schemas[] = {
      // q_win [B, Hq, W, D], k_cache [B, Hkv, C, D], lengths [B, Hkv] int32.
      // query_reduce: mean|sum; group_reduce: mean|max|mean_all|max_per_query (max: max over
      // the group of the window-reduced rows, AdaKV; max_per_query: max over the group per
      // window query, then the window reduce, G-KV); pool: none|avg|max.
      "window_scores{T}(Tensor q_win, Tensor k_cache, Tensor lengths, float? sm_scale=None, "
      "str query_reduce=\"mean\", str group_reduce=\"mean\", bool normalize=False, str pool=\"none\", "
      "int pool_kernel=1) -> Tensor",
      // mean [B, Hq, D] fp32, cov [B, Hq, D, D] fp32 (both future-RoPE averaged).
      "expected_attention_scores{T}(Tensor mean, Tensor? cov, Tensor k_cache, Tensor? v_cache, "
      "Tensor lengths, int n_sink=4, float epsilon=0., float? sm_scale=None) -> Tensor",
      // kind: key_norm|value_norm|keydiff|recency|random.
      "slot_scores{T}(Tensor k_cache, Tensor? v_cache, Tensor lengths, str kind, int seed=0) -> Tensor",
      "key_redundancy{T}(Tensor k_cache, Tensor lengths, int n_window, float threshold=0.5) -> Tensor",
      // hist_mode: max|ema|sum. hist [B, Hkv, C] fp32 is updated in place. (Not "mode": a
      // mutable op's argument named mode collides with torch.compile's auto_functionalized.)
      "update_scores{T}_(Tensor(a!) hist, Tensor new, Tensor lengths, Tensor hist_lengths, float decay, "
      "str hist_mode=\"max\") -> ()",
      // budgets [B, Hkv] int32 overrides budget. Returns (keep [B, Hkv, C] bool, new_lengths int32).
      "select_keep{T}(Tensor scores, Tensor lengths, Tensor? positions, Tensor? budgets, int budget, "
      "int n_sink=0, int n_recent=0, Tensor? protect_ranges=None, Tensor? keep_mask=None, "
      "Tensor? segment_cuts=None, Tensor? segment_min=None) -> (Tensor, Tensor)",
      "compact{T}_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lengths, Tensor keep, "
      "Tensor(d!)? positions=None, Tensor(e!)? hist=None, Tensor(f!)? log_w=None) -> ()",
      // select_keep + compact_; returns the keep mask taken before compaction.
      "evict{T}_(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lengths, Tensor(d!)? positions, "
      "Tensor scores, Tensor? budgets, int budget, int n_sink=0, int n_recent=0, "
      "Tensor? protect_ranges=None, Tensor? keep_mask=None, Tensor? segment_cuts=None, "
      "Tensor? segment_min=None, Tensor(e!)? hist=None, Tensor(f!)? log_w=None) -> Tensor",
      "allocate_head_budgets{T}(Tensor scores, Tensor lengths, int budget, float safeguard=0.2, "
      "int n_sink=0, int n_recent=0) -> Tensor",
      "score_evict{T}_(Tensor q_win, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lengths, "
      "Tensor(d!)? positions, Tensor? budgets, int budget, int n_sink=0, int n_recent=0, "
      "float? sm_scale=None, str query_reduce=\"mean\", str group_reduce=\"max_per_query\", bool normalize=True, "
      "str pool=\"none\", int pool_kernel=1, Tensor(e!)? hist=None, Tensor(g!)? hist_lengths=None, "
      "float decay=0.8, str hist_mode=\"max\", float mix_lambda=1., float redundancy_threshold=0.5, "
      "Tensor? protect_ranges=None, Tensor? keep_mask=None, Tensor(f!)? log_w=None) -> Tensor",
  };
  // ---- quantized KV (kvkern/reference.py: the layout and the quantizer) ----
  // bits in {2, 4, 8}; group G in {32, 64, 128}; the residual ring R = k_res.size(2)
  // (a multiple of G); capacity C = k_scale.size(2) * G (a multiple of R).
  const char* quant_schemas[] = {
      "quantize_kv{T}_(Tensor k, Tensor v, Tensor lengths, Tensor(a!) k_codes, Tensor(b!) k_scale, "
      "Tensor(c!) k_min, Tensor(d!) v_codes, Tensor(e!) v_scale, Tensor(f!) v_min, Tensor(g!) k_res, "
      "Tensor(h!) v_res, Tensor(i!)? k_mean, Tensor(j!)? v_mean, int bits, int group) -> ()",
      "dequantize_kv{T}(Tensor k_codes, Tensor k_scale, Tensor k_min, Tensor v_codes, Tensor v_scale, "
      "Tensor v_min, Tensor k_res, Tensor v_res, Tensor? k_mean, Tensor? v_mean, Tensor lengths, int bits, "
      "int group) -> (Tensor, Tensor)",
      "append_quantized_kv{T}_(Tensor k_new, Tensor v_new, Tensor(a!) lengths, Tensor(b!) k_codes, "
      "Tensor(c!) k_scale, Tensor(d!) k_min, Tensor(e!) v_codes, Tensor(f!) v_scale, Tensor(g!) v_min, "
      "Tensor(h!) k_res, Tensor(i!) v_res, Tensor(j!)? k_mean, Tensor(k!)? v_mean, int bits, int group) -> ()",
      "quant_decode_attention{T}(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_min, Tensor v_codes, "
      "Tensor v_scale, Tensor v_min, Tensor k_res, Tensor v_res, Tensor? k_mean, Tensor? v_mean, "
      "Tensor lengths, int bits, int group, float? sm_scale=None, int num_splits=0) -> (Tensor, Tensor)",
  };
  // ---- FP8 KV (kvkern/reference.py "FP8 KV"): k_fp8 / v_fp8 [B, Hkv, C, D] float8_e4m3fn,
  // k_scale / v_scale [Hkv] fp32 (x ≈ code * scale), lengths [B, Hkv] int32.
  const char* fp8_schemas[] = {
      "quantize_fp8_kv{T}_(Tensor k, Tensor v, Tensor lengths, Tensor k_scale, Tensor v_scale, "
      "Tensor(a!) k_fp8, Tensor(b!) v_fp8) -> ()",
      "append_fp8_kv{T}_(Tensor k_new, Tensor v_new, Tensor(a!) lengths, Tensor k_scale, Tensor v_scale, "
      "Tensor(b!) k_fp8, Tensor(c!) v_fp8) -> ()",
      "fp8_decode_attention{T}(Tensor q, Tensor k_fp8, Tensor v_fp8, Tensor k_scale, Tensor v_scale, "
      "Tensor lengths, float? sm_scale=None, int num_splits=0, int block_n=0, int num_warps=0, "
      "int num_stages=0) -> (Tensor, Tensor)",
  };
  for (const char* schema : fp8_schemas) {
    std::string s(schema);
    const auto at = s.find("{T}");
    m.def((s.substr(0, at) + s.substr(at + 3)).c_str());
    m.def((s.substr(0, at) + "_triton" + s.substr(at + 3)).c_str());
  }
  for (const char* schema : quant_schemas) {
    std::string s(schema);
    const auto at = s.find("{T}");
    m.def((s.substr(0, at) + s.substr(at + 3)).c_str());
    m.def((s.substr(0, at) + "_triton" + s.substr(at + 3)).c_str());
  }
  for (const char* schema : eviction_schemas) {
    std::string s(schema);
    const auto at = s.find("{T}");
    m.def((s.substr(0, at) + s.substr(at + 3)).c_str());
    m.def((s.substr(0, at) + "_triton" + s.substr(at + 3)).c_str());
  }
}

#ifdef KVKERN_PYTHON_MODULE
// Importing kvkern._C only has to load this library: its static initializers
// register the ops. No pybind11, so the module is Python-version independent.
#include <Python.h>
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
