// SPDX-License-Identifier: Apache-2.0
// A C++ program calling kvkern through the PyTorch dispatcher, as a libtorch
// application (no Python) would: find the op by name, call it, check the result
// against the same attention written with ATen ops. Exits non-zero on mismatch.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>

using DecodeAttentionFn = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, std::optional<double>, int64_t, int64_t, int64_t, int64_t);

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("kvkern::decode_attention", "")
                .typed<DecodeAttentionFn>();

  const int64_t B = 2, Hq = 8, Hkv = 2, C = 100, D = 64, G = Hq / Hkv;
  at::manual_seed(0);
  at::Tensor q = at::randn({B, Hq, D});
  at::Tensor k = at::randn({B, Hkv, C, D});
  at::Tensor v = at::randn({B, Hkv, C, D});
  at::Tensor log_w = at::randn({B, Hkv, C});
  at::Tensor lengths = at::tensor({100, 37, 1, 64}, at::kInt).view({B, Hkv});

  auto [out, lse] = op.call(q, k, v, lengths, log_w, std::nullopt, 0, 0, 0, 0);

  // The eager composite: repeat K/V over the GQA group, mask, softmax, weight V.
  at::Tensor valid = at::arange(C).view({1, 1, C}) < lengths.to(at::kLong).unsqueeze(-1);
  at::Tensor kr = k.repeat_interleave(G, 1), vr = v.repeat_interleave(G, 1);
  at::Tensor logits = at::matmul(kr, q.unsqueeze(-1)).squeeze(-1) / std::sqrt(double(D)) +
                      log_w.repeat_interleave(G, 1);
  logits = logits.masked_fill(~valid.repeat_interleave(G, 1), -INFINITY);
  at::Tensor expected = at::matmul(at::softmax(logits, -1).unsqueeze(-2), vr).squeeze(-2);
  at::Tensor expected_lse = at::logsumexp(logits, -1);

  const double out_err = (out - expected).abs().max().item<double>();
  const double lse_err = (lse - expected_lse).abs().max().item<double>();
  std::printf("kvkern::decode_attention through the dispatcher: out [%lld, %lld, %lld], "
              "max |out - eager| = %.3g, max |lse - eager| = %.3g\n",
              static_cast<long long>(out.size(0)), static_cast<long long>(out.size(1)),
              static_cast<long long>(out.size(2)), out_err, lse_err);
  if (!(out_err < 1e-5 && lse_err < 1e-5)) {
    std::fprintf(stderr, "MISMATCH\n");
    return 1;
  }
  return 0;
}
