// One pass over the parameters for the whole update: AdamW, then the EMA lerp toward the new
// parameter, then the EMA's bf16 shadow. Shared by the CPU loops and the CUDA kernel.
//
// Per element of a trainable tensor (torch's fused AdamW arithmetic, fused_adam_utils.cuh:
// hyperparameters in double, state in fp32, the same roundings):
//   g  = grad / grad_scale                           (double divide; grad_scale optional)
//   p -= lr * weight_decay * p                       (decoupled decay, double; if wd != 0)
//   m  = beta1 * m + (1 - beta1) * g                 (double, rounded to fp32)
//   v  = beta2 * v + (1 - beta2) * g * g
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)    bc = 1 - beta^step, step read per tensor
// then for every tensor (frozen ones too, e.g. pos_embed, which has no optimizer state):
//   ema = lerp(ema, p, w) (torch.lerp's two single-rounding forms), shadow = bf16(ema).
// A found_inf != 0 skips everything (parameters, moments, EMA, shadow), as torch's fused AdamW
// skips its update; the step counters are torch's (incremented and rolled back around the
// call by the Python side, exactly as torch.optim's fused path does).
// What it saves against fused AdamW + a separate EMA pass: the EMA pass's re-read of p and
// AdamW's write-back of the unscaled gradient (12 bytes per parameter).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#if defined(__CUDACC__)
#define SRA_FAST_HD __host__ __device__ __forceinline__
#else
#define SRA_FAST_HD inline
#endif

namespace sra_fast {

// One tensor of the update; 64 bytes, copied as-is into the device table. The gradient
// pointer is not here: gradients move between steps, so they live in their own array.
struct AdamWEmaTensorDesc {
  float* p;            // fp32 parameter, updated in place
  float* m;            // exp_avg (nullptr: frozen tensor, EMA only)
  float* v;            // exp_avg_sq
  const float* step;   // torch's per-parameter step counter (a 0-d fp32 tensor)
  float* ema;          // fp32 EMA, updated in place
  uint16_t* shadow;    // bf16 bits of the EMA, written; nullptr = none
  int64_t numel;
  int64_t pad;
};
static_assert(sizeof(AdamWEmaTensorDesc) == 64, "descriptor layout is shared with the device");

struct AdamWHyper {
  double beta1, beta2, eps, weight_decay;
};

// Elements per work chunk (a multiple of 4).
constexpr int64_t kAdamWChunk = 16384;

// The per-tensor scalars torch's kernel derives from lr and the step counter.
struct AdamWStepScalars {
  double lr;
  float step_size;     // lr / bias_correction1, rounded to fp32 as torch's opmath_t
  float bc2_sqrt;
};

SRA_FAST_HD AdamWStepScalars adamw_step_scalars(double lr, const AdamWHyper& h, float step) {
  const float bc1 = static_cast<float>(1.0 - pow(h.beta1, static_cast<double>(step)));
  const float bc2 = static_cast<float>(1.0 - pow(h.beta2, static_cast<double>(step)));
  AdamWStepScalars s;
  s.lr = lr;
  s.step_size = static_cast<float>(lr / static_cast<double>(bc1));
  s.bc2_sqrt = sqrtf(bc2);
  return s;
}

// AdamW on one element (p, m, v in place), given the already unscaled gradient g.
SRA_FAST_HD void adamw_element(float& p, float g, float& m, float& v, const AdamWHyper& h,
                               const AdamWStepScalars& s) {
  if (h.weight_decay != 0) {
    p = static_cast<float>(static_cast<double>(p) - s.lr * h.weight_decay * p);
  }
  m = static_cast<float>(h.beta1 * m + (1 - h.beta1) * g);
  v = static_cast<float>(h.beta2 * v + (1 - h.beta2) * g * g);
  const float denom = static_cast<float>(static_cast<double>(sqrtf(v) / s.bc2_sqrt) + h.eps);
  p -= s.step_size * m / denom;
}

// torch.lerp(e, q, w) in fp32: the single-rounding form for |w| < 0.5, the other otherwise.
SRA_FAST_HD float lerp_like_torch(float e, float q, float coeff, bool small) {
  return fmaf(coeff, q - e, small ? e : q);
}

// CPU: plain loops (parallel over chunks). Scalars are host values here.
void fused_adamw_ema_cpu(const std::vector<AdamWEmaTensorDesc>& descs,
                         const std::vector<const float*>& grads, const AdamWHyper& h, double lr,
                         const float* grad_scale, float ema_weight);

#ifdef WITH_CUDA
// CUDA: copy a host int64 tensor into the device buffer `dst` on the current stream (a pinned
// staging copy, so the host never waits); refuses while the stream is capturing a graph.
void adamw_ema_upload(at::Tensor& dst, const at::Tensor& host);

// CUDA: whether the current stream of `device` is capturing a CUDA graph.
bool adamw_ema_capturing(c10::Device device);

// CUDA: one launch over every tensor on the current stream of `device`. `table`: n_tensors
// AdamWEmaTensorDesc then n_chunks int64 entries (tensor << 32 | chunk); `grads`: n_tensors
// gradient pointers (0 for frozen tensors). lr, grad_scale (nullable), found_inf and
// ema_weight point to fp32 scalars on the device, read inside the kernel (capturable).
void fused_adamw_ema_cuda(const void* table, const void* grads, int64_t n_tensors,
                          int64_t n_chunks, AdamWHyper h, const float* lr,
                          const float* grad_scale, const float* found_inf,
                          const float* ema_weight, c10::Device device);
#endif

}  // namespace sra_fast
