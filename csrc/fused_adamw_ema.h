// One pass over the parameters for the whole update: AdamW, then the EMA lerp toward the new
// parameter, then the EMA's bf16 shadow. Shared by the CPU loops and the CUDA kernel.
//
// Per element of a trainable tensor, torch's own fused AdamW arithmetic for the device at
// hand, the same expressions so the same roundings:
//   g  = grad / grad_scale                           (grad_scale optional)
//   p -= lr * weight_decay * p                       (decoupled decay; if wd != 0)
//   m  = beta1 * m + (1 - beta1) * g
//   v  = beta2 * v + (1 - beta2) * g * g
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)    bc = 1 - beta^step, step read per tensor
// CPU (torch's CPU fused Adam, every version) and CUDA with torch < 2.11: hyperparameters in
// double (adamw_element). CUDA with torch >= 2.11 (fused_adam_utils.cuh since pytorch#173224):
// everything in fp32, the moments in fma form, bias corrections by powf (adamw_element_f32).
// The two differ by ~1e-5 relative in v (1 - 0.999f is not 1 - 0.999), which cancels in the
// update; a test against torch's fused AdamW sees it, so each device copies its own torch.
// then for every tensor (frozen ones too, e.g. pos_embed, which has no optimizer state):
//   ema = lerp(ema, p, w) (torch.lerp's two single-rounding forms), shadow = bf16(ema).
// A found_inf != 0 skips everything (parameters, moments, EMA, shadow), as torch's fused AdamW
// skips its update; the step counters are torch's (incremented and rolled back around the
// call by the Python side, exactly as torch.optim's fused path does).
// What it saves against fused AdamW + a separate EMA pass: the EMA pass's re-read of p and
// AdamW's write-back of the unscaled gradient (8 bytes per trained parameter), and the
// shadow copy's re-read of the EMA (4 bytes per shadowed parameter).
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

// torch >= 2.11's CUDA FusedAdamMathFunctor / adam_math (opmath_t = float): every
// hyperparameter cast to float, lr read as float, g /= float(grad_scale) by the caller.
struct AdamWStepScalarsF32 {
  float lr, beta1, beta2, weight_decay, eps, bc1, bc2_sqrt;
};

SRA_FAST_HD AdamWStepScalarsF32 adamw_step_scalars_f32(float lr, const AdamWHyper& h,
                                                       float step) {
  AdamWStepScalarsF32 s;
  s.lr = lr;
  s.beta1 = static_cast<float>(h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.weight_decay = static_cast<float>(h.weight_decay);
  s.eps = static_cast<float>(h.eps);
  s.bc1 = 1 - powf(s.beta1, step);
  s.bc2_sqrt = sqrtf(1 - powf(s.beta2, step));
  return s;
}

SRA_FAST_HD void adamw_element_f32(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                                   const AdamWStepScalarsF32& s) {
  if (s.weight_decay != 0) param -= s.lr * s.weight_decay * param;
  exp_avg = fmaf(s.beta1, exp_avg, fmaf(-s.beta1, grad, grad));
  exp_avg_sq = fmaf(s.beta2, exp_avg_sq, fmaf(-s.beta2, grad * grad, grad * grad));
  const float step_size = s.lr / s.bc1;
  const float denom = (sqrtf(exp_avg_sq) / s.bc2_sqrt) + s.eps;
  param -= step_size * exp_avg / denom;
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
