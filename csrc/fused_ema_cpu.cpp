// CPU implementation of the fused EMA update: plain loops, used by the tests and on CPU.
// std::fma gives the single rounding PyTorch's vectorized CPU lerp (Vectorized::fmadd) uses,
// so the result is bit-identical to torch.lerp; c10::BFloat16 rounds to nearest even like
// tensor.to(torch.bfloat16).
#include "fused_ema.h"

#include <cmath>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

namespace sra_fast {

namespace {

template <bool kSmall, bool kShadow>
void ema_range(const EmaTensorDesc& d, int64_t begin, int64_t end, float w) {
  float* __restrict__ ema = d.ema;
  const float* __restrict__ p = d.p;
  uint16_t* __restrict__ shadow = d.shadow;
  const float coeff = kSmall ? w : w - 1.0f;
  for (int64_t i = begin; i < end; ++i) {
    const float e = ema[i];
    const float q = p[i];
    const float r = std::fma(coeff, q - e, kSmall ? e : q);
    ema[i] = r;
    if (kShadow) shadow[i] = c10::BFloat16(r).x;
  }
}

}  // namespace

void fused_ema_cpu(const std::vector<EmaTensorDesc>& descs, float weight) {
  const bool small = std::abs(weight) < 0.5f;   // torch's is_lerp_weight_small
  for (const auto& d : descs) {
    if (d.numel == 0) continue;
    at::parallel_for(0, d.numel, kEmaChunk, [&](int64_t begin, int64_t end) {
      if (small) {
        d.shadow ? ema_range<true, true>(d, begin, end, weight)
                 : ema_range<true, false>(d, begin, end, weight);
      } else {
        d.shadow ? ema_range<false, true>(d, begin, end, weight)
                 : ema_range<false, false>(d, begin, end, weight);
      }
    });
  }
}

}  // namespace sra_fast
