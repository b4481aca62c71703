// Fused EMA update shared declarations: the per-tensor descriptor the CPU loops and the CUDA
// kernel both walk, and the entry points bindings.cpp calls.
//
// Per element: ema = lerp(ema, p, w) exactly as torch.lerp computes it in fp32
//   |w| <  0.5: ema = fma(w,     p - ema, ema)
//   |w| >= 0.5: ema = fma(w - 1, p - ema, p)
// (PyTorch's CPU vector path and nvcc's contraction of `self + w*(end-self)` both produce
// these single-rounding forms, so results are bit-identical to torch.lerp / _foreach_lerp_),
// then, where a shadow is given, shadow = bf16(ema) rounded to nearest even.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace sra_fast {

// One tensor of the update. 32 bytes; the CUDA path copies an array of these to the device.
struct EmaTensorDesc {
  float* ema;          // fp32, contiguous, updated in place
  const float* p;      // fp32, contiguous, read only
  uint16_t* shadow;    // bf16 bits, contiguous, written; nullptr = no shadow for this tensor
  int64_t numel;
};
static_assert(sizeof(EmaTensorDesc) == 32, "descriptor layout is shared with the device table");

// Elements per work chunk (multiple of 4 so a chunk keeps 16-byte vector alignment).
constexpr int64_t kEmaChunk = 16384;

// CPU: plain loops (parallel over chunks with at::parallel_for).
void fused_ema_cpu(const std::vector<EmaTensorDesc>& descs, float weight);

#ifdef WITH_CUDA
// CUDA: copy the host-built table (int64 CPU tensor) to `device`; refuses while the current
// stream is capturing a CUDA graph (the table must be on the device before capture).
at::Tensor fused_ema_upload_table(const at::Tensor& host_table, c10::Device device);

// CUDA: one launch over every tensor, on the current stream of `device`. `table` is the
// uploaded buffer: `n_tensors` EmaTensorDesc followed by `n_chunks` int64 chunk entries
// (tensor index << 32 | chunk index within the tensor). `weight` points to one fp32 on the
// device (the lerp weight, read inside the kernel, so a captured graph sees new values).
void fused_ema_cuda(const void* table, int64_t n_tensors, int64_t n_chunks,
                    const float* weight, c10::Device device);
#endif

}  // namespace sra_fast
