// CUDA one-pass AdamW + EMA (+ bf16 shadow) update: one launch over every parameter tensor.
//
// The table (built once per plan, bindings.cpp) holds one 64-byte descriptor per tensor and
// one int64 entry per 16K-element chunk; gradient pointers live in a separate small array,
// re-uploaded (5 KB at SiT-XL) only when the gradients moved. Blocks walk chunks grid-stride.
// lr, grad_scale, found_inf and the EMA weight are read from device memory inside the kernel,
// so the launch is capturable in a CUDA graph and replays see the values of the moment.
// Never build with --use_fast_math (it would change sqrt/div and flush denormals).
#include "fused_adamw_ema.h"

#include <algorithm>
#include <cstdint>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

// Which of torch's CUDA AdamW arithmetics to copy (fused_adamw_ema.h): fp32 since 2.11.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
#define SRA_FAST_ADAMW_F32 1
#else
#define SRA_FAST_ADAMW_F32 0
#endif

namespace sra_fast {

namespace {

constexpr int kThreads = 256;

#if SRA_FAST_ADAMW_F32
using OpMath = float;   // lr and grad_scale as torch's kernel reads them
using StepScalars = AdamWStepScalarsF32;
__device__ __forceinline__ StepScalars step_scalars(OpMath lr, const AdamWHyper& h, float step) {
  return adamw_step_scalars_f32(lr, h, step);
}
__device__ __forceinline__ void adamw(float& p, float g, float& m, float& v, const AdamWHyper&,
                                      const StepScalars& s) {
  adamw_element_f32(p, g, m, v, s);
}
#else
using OpMath = double;
using StepScalars = AdamWStepScalars;
__device__ __forceinline__ StepScalars step_scalars(OpMath lr, const AdamWHyper& h, float step) {
  return adamw_step_scalars(lr, h, step);
}
__device__ __forceinline__ void adamw(float& p, float g, float& m, float& v, const AdamWHyper& h,
                                      const StepScalars& s) {
  adamw_element(p, g, m, v, h, s);
}
#endif

__global__ void __launch_bounds__(kThreads)
fused_adamw_ema_kernel(const AdamWEmaTensorDesc* __restrict__ descs,
                       const int64_t* __restrict__ chunks, const float* const* __restrict__ grads,
                       int64_t n_chunks, AdamWHyper h, const float* __restrict__ lr_ptr,
                       const float* __restrict__ grad_scale_ptr,
                       const float* __restrict__ found_inf_ptr,
                       const float* __restrict__ weight_ptr) {
  if (*found_inf_ptr != 0.0f) return;   // a skipped step changes nothing
  const float w = *weight_ptr;
  const bool small = fabsf(w) < 0.5f;
  const float coeff = small ? w : w - 1.0f;
  const OpMath lr = static_cast<OpMath>(*lr_ptr);
  const bool scaled = grad_scale_ptr != nullptr;
  const OpMath grad_scale = scaled ? static_cast<OpMath>(*grad_scale_ptr) : OpMath(1);

  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const int64_t entry = chunks[c];
    const int64_t t = entry >> 32;
    const AdamWEmaTensorDesc d = descs[t];
    const int64_t start = (entry & 0xffffffffLL) * kAdamWChunk;
    const int64_t len = min(kAdamWChunk, d.numel - start);
    const bool train = d.m != nullptr;
    const StepScalars s = step_scalars(lr, h, train ? *d.step : 1.0f);
    float* __restrict__ p = d.p + start;
    float* __restrict__ ema = d.ema + start;
    uint16_t* __restrict__ sh = d.shadow ? d.shadow + start : nullptr;
    if (train) {
      const float* __restrict__ g = grads[t] + start;
      float* __restrict__ m = d.m + start;
      float* __restrict__ v = d.v + start;
      // Chunks start at multiples of 4 elements: with 16-byte aligned base pointers (8 for
      // the bf16 shadow) every chunk takes 4-wide vector loads and stores (block-uniform).
      const bool vec = ((reinterpret_cast<uintptr_t>(d.p) | reinterpret_cast<uintptr_t>(d.m) |
                         reinterpret_cast<uintptr_t>(d.v) | reinterpret_cast<uintptr_t>(d.ema) |
                         reinterpret_cast<uintptr_t>(grads[t])) & 15) == 0 &&
                       (reinterpret_cast<uintptr_t>(d.shadow) & 7) == 0;
      int64_t done = 0;
      if (vec) {
        const int64_t n4 = len >> 2;
        for (int64_t i = threadIdx.x; i < n4; i += kThreads) {
          const float4 g4 = reinterpret_cast<const float4*>(g)[i];
          float4 p4 = reinterpret_cast<float4*>(p)[i];
          float4 m4 = reinterpret_cast<float4*>(m)[i];
          float4 v4 = reinterpret_cast<float4*>(v)[i];
          float4 e4 = reinterpret_cast<float4*>(ema)[i];
          float gs[4] = {g4.x, g4.y, g4.z, g4.w};
          float* ps[4] = {&p4.x, &p4.y, &p4.z, &p4.w};
          float* ms[4] = {&m4.x, &m4.y, &m4.z, &m4.w};
          float* vs[4] = {&v4.x, &v4.y, &v4.z, &v4.w};
          float* es[4] = {&e4.x, &e4.y, &e4.z, &e4.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            float gk = gs[k];
            if (scaled) gk = static_cast<float>(gk / grad_scale);
            adamw(*ps[k], gk, *ms[k], *vs[k], h, s);
            *es[k] = lerp_like_torch(*es[k], *ps[k], coeff, small);
          }
          reinterpret_cast<float4*>(p)[i] = p4;
          reinterpret_cast<float4*>(m)[i] = m4;
          reinterpret_cast<float4*>(v)[i] = v4;
          reinterpret_cast<float4*>(ema)[i] = e4;
          if (sh != nullptr) {
            reinterpret_cast<uint2*>(sh)[i] = make_uint2(
                static_cast<uint32_t>(c10::BFloat16(e4.x).x) |
                    (static_cast<uint32_t>(c10::BFloat16(e4.y).x) << 16),
                static_cast<uint32_t>(c10::BFloat16(e4.z).x) |
                    (static_cast<uint32_t>(c10::BFloat16(e4.w).x) << 16));
          }
        }
        done = n4 << 2;
      }
      for (int64_t i = done + threadIdx.x; i < len; i += kThreads) {
        float gi = g[i];
        if (scaled) gi = static_cast<float>(gi / grad_scale);
        float pi = p[i], mi = m[i], vi = v[i];
        adamw(pi, gi, mi, vi, h, s);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        const float e = lerp_like_torch(ema[i], pi, coeff, small);
        ema[i] = e;
        if (sh != nullptr) sh[i] = c10::BFloat16(e).x;
      }
    } else {
      for (int64_t i = threadIdx.x; i < len; i += kThreads) {
        const float e = lerp_like_torch(ema[i], p[i], coeff, small);
        ema[i] = e;
        if (sh != nullptr) sh[i] = c10::BFloat16(e).x;
      }
    }
  }
}

}  // namespace

void adamw_ema_upload(at::Tensor& dst, const at::Tensor& host) {
  TORCH_CHECK(dst.is_cuda(), "adamw_ema_upload: expected a CUDA destination");
  c10::cuda::CUDAGuard guard(dst.device());
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                  c10::cuda::CaptureStatus::None,
              "FusedAdamWEMA: the pointer table cannot be uploaded while a CUDA graph is "
              "being captured; call commit() after capture");
  // pinned staging + async copy on the current stream: ordered after the kernels that still
  // read the old contents, and the caching host allocator keeps the staging buffer alive
  at::Tensor pinned = at::empty(host.sizes(), host.options().pinned_memory(true));
  pinned.copy_(host);
  dst.copy_(pinned, /*non_blocking=*/true);
}

bool adamw_ema_capturing(c10::Device device) {
  c10::cuda::CUDAGuard guard(device);
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

void fused_adamw_ema_cuda(const void* table, const void* grads, int64_t n_tensors,
                          int64_t n_chunks, AdamWHyper h, const float* lr,
                          const float* grad_scale, const float* found_inf,
                          const float* ema_weight, c10::Device device) {
  if (n_chunks == 0) return;
  c10::cuda::CUDAGuard guard(device);
  const auto* descs = static_cast<const AdamWEmaTensorDesc*>(table);
  const auto* chunks = reinterpret_cast<const int64_t*>(descs + n_tensors);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  const int64_t max_blocks = static_cast<int64_t>(sms) * (2048 / kThreads);
  const int blocks = static_cast<int>(std::min<int64_t>(n_chunks, max_blocks));
  fused_adamw_ema_kernel<<<blocks, kThreads, 0,
                           c10::cuda::getCurrentCUDAStream(device.index())>>>(
      descs, chunks, static_cast<const float* const*>(grads), n_chunks, h, lr, grad_scale,
      found_inf, ema_weight);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sra_fast
