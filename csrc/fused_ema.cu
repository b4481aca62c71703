// CUDA fused EMA update: one launch over every parameter tensor (multi-tensor apply).
//
// The host side (bindings.cpp) builds, once, a device table of per-tensor descriptors
// (ema / p / shadow pointers, numel) followed by one int64 entry per 16K-element chunk.
// Each block walks chunks grid-stride, so one launch covers any number of tensors and the
// launch itself allocates nothing and reads the lerp weight from device memory: capturable
// in a CUDA graph, and a replay sees whatever value the weight tensor holds then.
//
// Numerics match PyTorch bit for bit: torch's CUDA lerp is `self + w*(end-self)` for |w| < 0.5
// and `end - (end-self)*(1-w)` otherwise, which nvcc contracts to one fma each; we write the
// fmas explicitly (so flags cannot change them; never build this with --use_fast_math /
// -ftz=true, which would flush denormals torch keeps). The bf16 shadow uses c10::BFloat16's
// constructor, the same conversion tensor.to(torch.bfloat16) runs on the device.
#include "fused_ema.h"

#include <algorithm>
#include <cstdint>

// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <cuda_runtime.h>

namespace sra_fast {

namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ uint32_t bf16_bits(float v) {
  return static_cast<uint32_t>(c10::BFloat16(v).x);
}

__device__ __forceinline__ void lerp4(float4& e, const float4& q, float coeff, bool small) {
  e.x = fmaf(coeff, q.x - e.x, small ? e.x : q.x);
  e.y = fmaf(coeff, q.y - e.y, small ? e.y : q.y);
  e.z = fmaf(coeff, q.z - e.z, small ? e.z : q.z);
  e.w = fmaf(coeff, q.w - e.w, small ? e.w : q.w);
}

// Four bf16 values packed for one 8-byte store (little endian: lower address in low bits).
__device__ __forceinline__ uint2 bf16x4(const float4& v) {
  return make_uint2(bf16_bits(v.x) | (bf16_bits(v.y) << 16),
                    bf16_bits(v.z) | (bf16_bits(v.w) << 16));
}

__global__ void __launch_bounds__(kThreads)
fused_ema_kernel(const EmaTensorDesc* __restrict__ descs, const int64_t* __restrict__ chunks,
                 int64_t n_chunks, const float* __restrict__ weight) {
  const float w = *weight;
  const bool small = fabsf(w) < 0.5f;          // torch's is_lerp_weight_small
  const float coeff = small ? w : w - 1.0f;    // (w - 1) * d == -(1 - w) * d exactly

  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const int64_t entry = chunks[c];
    const EmaTensorDesc d = descs[entry >> 32];
    const int64_t start = (entry & 0xffffffffLL) * kEmaChunk;
    const int64_t len = min(kEmaChunk, d.numel - start);
    float* __restrict__ ema = d.ema + start;
    const float* __restrict__ p = d.p + start;
    uint16_t* __restrict__ sh = d.shadow ? d.shadow + start : nullptr;
    // Pointers read from the table are generic; tell nvcc they are global (ld/st.global).
    __builtin_assume(__isGlobal(ema));
    __builtin_assume(__isGlobal(p));

    // Chunks start at multiples of 4 elements, so a tensor whose base pointers are aligned
    // (fp32 to 16 B, bf16 to 8 B) is aligned in every chunk. Block-uniform branch.
    const bool vec = ((reinterpret_cast<uintptr_t>(d.ema) | reinterpret_cast<uintptr_t>(d.p))
                      & 15) == 0 && (reinterpret_cast<uintptr_t>(d.shadow) & 7) == 0;
    int64_t done = 0;
    if (vec) {
      const int64_t n4 = len >> 2;
      float4* __restrict__ e4 = reinterpret_cast<float4*>(ema);
      const float4* __restrict__ p4 = reinterpret_cast<const float4*>(p);
      uint2* __restrict__ s4 = reinterpret_cast<uint2*>(sh);
      int64_t i = threadIdx.x;
      // Two float4 pairs per thread per iteration, both loaded before either store (nvcc
      // does not hoist loads above the stores by itself; no further unrolling, to stay at
      // <= 32 registers = 2048 resident threads per SM).
#pragma unroll 1
      for (; i + kThreads < n4; i += 2 * kThreads) {
        float4 e0 = e4[i];
        float4 e1 = e4[i + kThreads];
        const float4 q0 = p4[i];
        const float4 q1 = p4[i + kThreads];
        lerp4(e0, q0, coeff, small);
        lerp4(e1, q1, coeff, small);
        e4[i] = e0;
        e4[i + kThreads] = e1;
        if (sh != nullptr) {
          __builtin_assume(__isGlobal(s4));
          s4[i] = bf16x4(e0);
          s4[i + kThreads] = bf16x4(e1);
        }
      }
      if (i < n4) {
        float4 e0 = e4[i];
        lerp4(e0, p4[i], coeff, small);
        e4[i] = e0;
        if (sh != nullptr) {
          __builtin_assume(__isGlobal(s4));
          s4[i] = bf16x4(e0);
        }
      }
      done = n4 << 2;
    }
    for (int64_t i = done + threadIdx.x; i < len; i += kThreads) {
      const float e = ema[i];
      const float q = p[i];
      const float r = fmaf(coeff, q - e, small ? e : q);
      ema[i] = r;
      if (sh != nullptr) {
        __builtin_assume(__isGlobal(sh));
        sh[i] = static_cast<uint16_t>(bf16_bits(r));
      }
    }
  }
}

}  // namespace

at::Tensor fused_ema_upload_table(const at::Tensor& host_table, c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "fused_ema_upload_table: expected a CUDA device");
  c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() ==
                  c10::cuda::CaptureStatus::None,
              "FusedEMA: build the plan (prepare) before CUDA graph capture; the pointer "
              "table is copied to the device once, which a capturing stream cannot do");
  return host_table.to(device);
}

void fused_ema_cuda(const void* table, int64_t n_tensors, int64_t n_chunks,
                    const float* weight, c10::Device device) {
  if (n_chunks == 0) return;
  c10::cuda::CUDAGuard guard(device);
  const auto* descs = static_cast<const EmaTensorDesc*>(table);
  const auto* chunks = reinterpret_cast<const int64_t*>(descs + n_tensors);
  // Enough resident threads to saturate HBM (2048 per SM), no more: blocks loop over chunks.
  int sms = 0;   // a cheap attribute query (no sync; allowed while capturing)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  const int64_t max_blocks = static_cast<int64_t>(sms) * (2048 / kThreads);
  const int blocks = static_cast<int>(std::min<int64_t>(n_chunks, max_blocks));
  fused_ema_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream(device.index())>>>(
      descs, chunks, n_chunks, weight);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sra_fast
