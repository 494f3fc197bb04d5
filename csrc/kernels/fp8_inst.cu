// SPDX-License-Identifier: Apache-2.0
// The launchers of fp8_launch.h over the kernels of fp8_kv.cuh. Instantiated:
// fp8_decode_kernel for {fp32, fp16, bf16} x head_dim {64, 128, 256} x heads
// tile {1, 2, 4, 8}; quantize / append for {fp32, fp16, bf16}.

#include <kvkern/fp8_kv.cuh>
#include <kvkern/fp8_launch.h>

namespace kvkern {

bool fp8_decode_attention_supported(const Fp8KVParams& p) { return fp8_detail::attention_ok(p); }

int fp8_decode_default_splits(const Fp8KVParams& p, int num_sms) { return fp8_detail::default_splits(p, num_sms); }

cudaError_t launch_fp8_decode_attention(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream) {
  using namespace fp8_detail;
  if (!attention_ok(p) || p.num_splits < 1 ||
      (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)))
    return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  switch (dtype) {
    case KvDtype::kFloat32: return run_attention<float>(p, dtype, stream);
    case KvDtype::kFloat16: return run_attention<__half>(p, dtype, stream);
    case KvDtype::kBFloat16: return run_attention<__nv_bfloat16>(p, dtype, stream);
  }
  return cudaErrorInvalidValue;
}

namespace {
bool cache_ok(const Fp8KVParams& p) {
  return p.batch >= 0 && p.num_kv_heads > 0 && p.head_dim > 0 && p.capacity >= 0 && p.k_fp8.data && p.v_fp8.data &&
         p.k_scale && p.v_scale && p.lengths && p.k_in.data && p.v_in.data;
}

template <typename F>
cudaError_t by_dtype(KvDtype dtype, F&& f) {
  switch (dtype) {
    case KvDtype::kFloat32: return f(float{});
    case KvDtype::kFloat16: return f(__half{});
    case KvDtype::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}
}  // namespace

cudaError_t launch_quantize_fp8_kv(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream) {
  using namespace fp8_detail;
  if (!cache_ok(p) || p.in_tokens < 0 || p.in_tokens > p.capacity) return cudaErrorInvalidValue;
  const int64_t work = p.batch * p.num_kv_heads * p.in_tokens * p.head_dim;
  if (work == 0) return cudaSuccess;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    fp8_quantize_kernel<T><<<static_cast<unsigned>(grid_for(work)), kFp8QuantThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_append_fp8_kv(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream) {
  using namespace fp8_detail;
  if (!cache_ok(p)) return cudaErrorInvalidValue;
  const int64_t blocks = p.batch * p.num_kv_heads;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const int threads = p.head_dim >= kFp8QuantThreads ? kFp8QuantThreads : static_cast<int>((p.head_dim + 31) / 32 * 32);
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    fp8_append_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace kvkern
