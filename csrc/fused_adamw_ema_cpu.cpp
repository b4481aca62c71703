// CPU implementation of the one-pass AdamW + EMA update: plain loops over the shared
// per-element math (fused_adamw_ema.h), used by the tests and on CPU.
#include "fused_adamw_ema.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

namespace sra_fast {

void fused_adamw_ema_cpu(const std::vector<AdamWEmaTensorDesc>& descs,
                         const std::vector<const float*>& grads, const AdamWHyper& h, double lr,
                         const float* grad_scale, float ema_weight) {
  const bool small = std::abs(ema_weight) < 0.5f;   // torch's is_lerp_weight_small
  const float coeff = small ? ema_weight : ema_weight - 1.0f;
  for (size_t t = 0; t < descs.size(); ++t) {
    const AdamWEmaTensorDesc& d = descs[t];
    if (d.numel == 0) continue;
    const bool train = d.m != nullptr;
    const AdamWStepScalars s = adamw_step_scalars(lr, h, train ? *d.step : 1.0f);
    const float* g = grads[t];
    at::parallel_for(0, d.numel, kAdamWChunk, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float p = d.p[i];
        if (train) {
          float gi = g[i];
          if (grad_scale != nullptr) {
            gi = static_cast<float>(gi / static_cast<double>(*grad_scale));
          }
          adamw_element(p, gi, d.m[i], d.v[i], h, s);
          d.p[i] = p;
        }
        const float e = lerp_like_torch(d.ema[i], p, coeff, small);
        d.ema[i] = e;
        if (d.shadow != nullptr) d.shadow[i] = c10::BFloat16(e).x;
      }
    });
  }
}

}  // namespace sra_fast
