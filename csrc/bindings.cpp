// Python module sra_fast._C (pybind11): the fused EMA plan.
//
// FusedEMAPlan(ema, model, shadow=None) checks the tensor lists once, keeps references to
// them and (on CUDA) uploads the pointer table to the device; plan.step(weight) then
// launches one kernel (CUDA) or runs the CPU loops. step() allocates nothing and never
// syncs on CUDA, so it can be captured in a CUDA graph as long as the plan was built before
// capture. The CUDA sources compile only with -DWITH_CUDA.

// Slim includes (not torch/extension.h): the JIT build of this file takes ~10 s, not ~40 s.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "fused_ema.h"

namespace sra_fast {

// Hidden like pybind11's own types (else GCC warns when the module is built without
// -fvisibility=hidden, as torch.utils.cpp_extension does).
#if defined(__GNUC__)
#define SRA_FAST_HIDDEN __attribute__((visibility("hidden")))
#else
#define SRA_FAST_HIDDEN
#endif

class SRA_FAST_HIDDEN FusedEMAPlan {
 public:
  FusedEMAPlan(std::vector<at::Tensor> ema, std::vector<at::Tensor> model,
               std::optional<std::vector<std::optional<at::Tensor>>> shadow)
      : ema_(std::move(ema)), model_(std::move(model)) {
    const size_t n = ema_.size();
    TORCH_CHECK(model_.size() == n, "FusedEMAPlan: ", n, " EMA tensors but ", model_.size(),
                " model tensors");
    if (shadow.has_value()) {
      TORCH_CHECK(shadow->size() == n, "FusedEMAPlan: shadow list has ", shadow->size(),
                  " entries, expected ", n, " (one per EMA tensor, None where there is none)");
    }
    device_ = n ? ema_[0].device() : c10::Device(c10::kCPU);
    shadow_.resize(n);
    descs_.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& e = ema_[i];
      const at::Tensor& p = model_[i];
      TORCH_CHECK(e.device() == device_ && p.device() == device_, "FusedEMAPlan: tensor ", i,
                  " is on ", e.device(), " / ", p.device(), ", expected ", device_);
      TORCH_CHECK(e.scalar_type() == at::kFloat && p.scalar_type() == at::kFloat,
                  "FusedEMAPlan: tensor ", i, " has dtype ", e.scalar_type(), " / ",
                  p.scalar_type(), "; EMA and model tensors must be float32");
      TORCH_CHECK(e.is_contiguous() && p.is_contiguous(), "FusedEMAPlan: tensor ", i,
                  " is not contiguous");
      TORCH_CHECK(e.numel() == p.numel(), "FusedEMAPlan: tensor ", i, " has ", e.numel(),
                  " EMA elements but ", p.numel(), " model elements");
      uint16_t* sp = nullptr;
      if (shadow.has_value() && (*shadow)[i].has_value() && (*shadow)[i]->defined()) {
        const at::Tensor& s = *(*shadow)[i];
        TORCH_CHECK(s.device() == device_, "FusedEMAPlan: shadow ", i, " is on ", s.device(),
                    ", expected ", device_);
        TORCH_CHECK(s.scalar_type() == at::kBFloat16, "FusedEMAPlan: shadow ", i,
                    " has dtype ", s.scalar_type(), ", expected bfloat16");
        TORCH_CHECK(s.is_contiguous(), "FusedEMAPlan: shadow ", i, " is not contiguous");
        TORCH_CHECK(s.numel() == e.numel(), "FusedEMAPlan: shadow ", i, " has ", s.numel(),
                    " elements, expected ", e.numel());
        shadow_[i] = s;
        sp = reinterpret_cast<uint16_t*>(s.data_ptr());
      }
      descs_.push_back({e.data_ptr<float>(), p.data_ptr<float>(), sp, e.numel()});
      numel_ += e.numel();
      const int64_t chunks = (e.numel() + kEmaChunk - 1) / kEmaChunk;
      TORCH_CHECK(chunks < (int64_t(1) << 31), "FusedEMAPlan: tensor ", i, " is too large");
      for (int64_t c = 0; c < chunks; ++c) {
        chunk_entries_.push_back((static_cast<int64_t>(i) << 32) | c);
      }
    }
    if (device_.is_cuda()) {
#ifdef WITH_CUDA
      const int64_t desc_words = static_cast<int64_t>(n) * 4;   // 32-byte descriptors
      at::Tensor host = at::empty({desc_words + static_cast<int64_t>(chunk_entries_.size())},
                                  at::dtype(at::kLong));
      auto* words = host.data_ptr<int64_t>();
      if (n) std::memcpy(words, descs_.data(), n * sizeof(EmaTensorDesc));
      if (!chunk_entries_.empty()) {
        std::memcpy(words + desc_words, chunk_entries_.data(),
                    chunk_entries_.size() * sizeof(int64_t));
      }
      table_ = fused_ema_upload_table(host, device_);
#else
      TORCH_CHECK(false, "FusedEMAPlan: this build of the extension has no CUDA support "
                  "(compiled without WITH_CUDA); tensors are on ", device_);
#endif
    } else {
      TORCH_CHECK(device_.is_cpu(), "FusedEMAPlan: unsupported device ", device_);
    }
  }

  // One update with lerp weight `weight` (a one-element float32 tensor on the plan's device).
  void step(const at::Tensor& weight) {
    TORCH_CHECK(weight.numel() == 1 && weight.scalar_type() == at::kFloat,
                "FusedEMAPlan.step: weight must be a one-element float32 tensor, got ",
                weight.sizes(), " ", weight.scalar_type());
    if (descs_.empty()) return;
    TORCH_CHECK(weight.device() == device_, "FusedEMAPlan.step: weight is on ",
                weight.device(), ", expected ", device_);
    check_unchanged();
    if (device_.is_cuda()) {
#ifdef WITH_CUDA
      fused_ema_cuda(table_.data_ptr(), static_cast<int64_t>(descs_.size()),
                     static_cast<int64_t>(chunk_entries_.size()),
                     weight.data_ptr<float>(), device_);
#endif
    } else {
      fused_ema_cpu(descs_, weight.item<float>());
    }
    // Like any in-place op: autograd's saved-tensor checks and version-based staleness
    // tests (sra_fast.teacher.BF16Shadow) see the write.
    for (auto& t : ema_) t.unsafeGetTensorImpl()->bump_version();
    for (auto& t : shadow_) {
      if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
    }
  }

  int64_t num_tensors() const { return static_cast<int64_t>(descs_.size()); }
  int64_t num_chunks() const { return static_cast<int64_t>(chunk_entries_.size()); }
  int64_t numel() const { return numel_; }
  int64_t num_shadows() const {
    int64_t k = 0;
    for (const auto& t : shadow_) k += t.defined();
    return k;
  }
  std::string device() const { return device_.str(); }

 private:
  // The table holds raw pointers: refuse to run if a tensor's storage was swapped
  // (e.g. `param.data = ...`) since the plan was built. Host-side compare, no sync.
  void check_unchanged() const {
    for (size_t i = 0; i < descs_.size(); ++i) {
      const bool same = ema_[i].data_ptr() == static_cast<void*>(descs_[i].ema) &&
                        model_[i].data_ptr() == static_cast<const void*>(descs_[i].p) &&
                        (!shadow_[i].defined() ||
                         shadow_[i].data_ptr() == static_cast<void*>(descs_[i].shadow));
      TORCH_CHECK(same, "FusedEMAPlan.step: tensor ", i, " no longer has the storage the "
                  "plan was built with; build a new plan (FusedEMA) after replacing tensors");
    }
  }

  std::vector<at::Tensor> ema_, model_, shadow_;   // held so the pointers stay valid
  std::vector<EmaTensorDesc> descs_;
  std::vector<int64_t> chunk_entries_;
  at::Tensor table_;                                // device copy (CUDA plans only)
  c10::Device device_{c10::kCPU};
  int64_t numel_ = 0;
};

}  // namespace sra_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sra-fast C++/CUDA extension: multi-tensor fused EMA update";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("chunk_elements") = sra_fast::kEmaChunk;
  // module_local: a JIT build and an installed sra_fast._C may both be loaded in a process.
  py::class_<sra_fast::FusedEMAPlan>(m, "FusedEMAPlan", py::module_local())
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::optional<std::vector<std::optional<at::Tensor>>>>(),
           py::arg("ema"), py::arg("model"), py::arg("shadow") = py::none())
      .def("step", &sra_fast::FusedEMAPlan::step, py::arg("weight"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_tensors", &sra_fast::FusedEMAPlan::num_tensors)
      .def_property_readonly("num_chunks", &sra_fast::FusedEMAPlan::num_chunks)
      .def_property_readonly("num_shadows", &sra_fast::FusedEMAPlan::num_shadows)
      .def_property_readonly("numel", &sra_fast::FusedEMAPlan::numel)
      .def_property_readonly("device", &sra_fast::FusedEMAPlan::device);
}
