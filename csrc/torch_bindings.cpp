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
