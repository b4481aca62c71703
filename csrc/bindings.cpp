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
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "fused_adamw_ema.h"
#include "fused_ema.h"

namespace sra_fast {

// A plan's device table, built on the host: the descriptors (as 8-byte words), then one int64
// entry per work chunk (tensor << 32 | chunk). Both plans' kernels read this layout.
template <typename Desc>
at::Tensor pack_plan_table(const std::vector<Desc>& descs, const std::vector<int64_t>& chunks) {
  static_assert(sizeof(Desc) % sizeof(int64_t) == 0, "descriptors are whole 8-byte words");
  const int64_t desc_words = static_cast<int64_t>(descs.size() * sizeof(Desc) / sizeof(int64_t));
  at::Tensor host = at::empty({desc_words + static_cast<int64_t>(chunks.size())},
                              at::dtype(at::kLong));
  auto* words = host.data_ptr<int64_t>();
  if (!descs.empty()) std::memcpy(words, descs.data(), descs.size() * sizeof(Desc));
  if (!chunks.empty()) {
    std::memcpy(words + desc_words, chunks.data(), chunks.size() * sizeof(int64_t));
  }
  return host;
}

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
      table_ = fused_ema_upload_table(pack_plan_table(descs_, chunk_entries_), device_);
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

// One-pass AdamW + EMA (+ bf16 shadow) over every parameter tensor (fused_adamw_ema.h).
//
// FusedAdamWEMAPlan(params, exp_avgs, exp_avg_sqs, steps, ema, shadow, beta1, beta2, eps,
// weight_decay): lists aligned by tensor; exp_avgs/exp_avg_sqs/steps hold None for tensors
// the optimizer does not train (they get the EMA lerp only). The fixed pointers go to the
// device once. step(grads, lr, found_inf, grad_scale, ema_weight) takes the gradients of the
// moment (None for untrained tensors): when they moved since the last call, their pointer
// array is re-uploaded, or, while a CUDA graph is being captured (when nothing may be
// uploaded), kept pending until commit(), which the caller runs right after the capture.
class SRA_FAST_HIDDEN FusedAdamWEMAPlan {
 public:
  using OptList = std::vector<std::optional<at::Tensor>>;

  FusedAdamWEMAPlan(std::vector<at::Tensor> params, OptList exp_avgs, OptList exp_avg_sqs,
                    OptList steps, std::vector<at::Tensor> ema, OptList shadow, double beta1,
                    double beta2, double eps, double weight_decay)
      : params_(std::move(params)), ema_(std::move(ema)), hyper_{beta1, beta2, eps, weight_decay} {
    const size_t n = params_.size();
    TORCH_CHECK(ema_.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                    steps.size() == n && shadow.size() == n,
                "FusedAdamWEMAPlan: the lists must be aligned (", n, " parameters, ",
                ema_.size(), " EMA, ", exp_avgs.size(), " exp_avg, ", exp_avg_sqs.size(),
                " exp_avg_sq, ", steps.size(), " steps, ", shadow.size(), " shadow entries)");
    device_ = n ? params_[0].device() : c10::Device(c10::kCPU);
    auto fp32 = [&](const at::Tensor& t, size_t i, const char* what, int64_t numel) {
      TORCH_CHECK(t.device() == device_, "FusedAdamWEMAPlan: ", what, " ", i, " is on ",
                  t.device(), ", expected ", device_);
      TORCH_CHECK(t.scalar_type() == at::kFloat, "FusedAdamWEMAPlan: ", what, " ", i,
                  " has dtype ", t.scalar_type(), ", expected float32");
      TORCH_CHECK(t.is_contiguous(), "FusedAdamWEMAPlan: ", what, " ", i,
                  " is not contiguous");
      TORCH_CHECK(numel < 0 || t.numel() == numel, "FusedAdamWEMAPlan: ", what, " ", i,
                  " has ", t.numel(), " elements, expected ", numel);
    };
    auto get = [](const OptList& l, size_t i) -> at::Tensor {
      return (l[i].has_value() && l[i]->defined()) ? *l[i] : at::Tensor();
    };
    held_.reserve(3 * n);
    for (size_t i = 0; i < n; ++i) {
      const int64_t numel = params_[i].numel();
      fp32(params_[i], i, "parameter", -1);
      fp32(ema_[i], i, "EMA tensor", numel);
      AdamWEmaTensorDesc d{};
      d.p = params_[i].data_ptr<float>();
      d.ema = ema_[i].data_ptr<float>();
      d.numel = numel;
      const at::Tensor m = get(exp_avgs, i), v = get(exp_avg_sqs, i), st = get(steps, i);
      TORCH_CHECK(m.defined() == v.defined() && m.defined() == st.defined(),
                  "FusedAdamWEMAPlan: tensor ", i, " has only part of the optimizer state");
      if (m.defined()) {
        fp32(m, i, "exp_avg", numel);
        fp32(v, i, "exp_avg_sq", numel);
        fp32(st, i, "step", 1);
        d.m = m.data_ptr<float>();
        d.v = v.data_ptr<float>();
        d.step = st.data_ptr<float>();
        held_.push_back(m);
        held_.push_back(v);
        held_.push_back(st);
        ++n_trained_;
      }
      const at::Tensor sh = get(shadow, i);
      if (sh.defined()) {
        TORCH_CHECK(sh.device() == device_ && sh.scalar_type() == at::kBFloat16 &&
                        sh.is_contiguous() && sh.numel() == numel,
                    "FusedAdamWEMAPlan: shadow ", i, " must be a contiguous bfloat16 tensor "
                    "of ", numel, " elements on ", device_);
        d.shadow = reinterpret_cast<uint16_t*>(sh.data_ptr());
        held_.push_back(sh);
      }
      descs_.push_back(d);
      const int64_t chunks = (numel + kAdamWChunk - 1) / kAdamWChunk;
      TORCH_CHECK(chunks < (int64_t(1) << 31), "FusedAdamWEMAPlan: tensor ", i,
                  " is too large");
      for (int64_t c = 0; c < chunks; ++c) {
        chunk_entries_.push_back((static_cast<int64_t>(i) << 32) | c);
      }
    }
    grads_.assign(n, nullptr);
    if (device_.is_cuda()) {
#ifdef WITH_CUDA
      at::Tensor host = pack_plan_table(descs_, chunk_entries_);
      table_ = at::empty(host.sizes(), host.options().device(device_));
      adamw_ema_upload(table_, host);
      grad_table_ = at::zeros({std::max<int64_t>(1, static_cast<int64_t>(n))},
                              at::dtype(at::kLong).device(device_));
#else
      TORCH_CHECK(false, "FusedAdamWEMAPlan: this build of the extension has no CUDA support; "
                  "tensors are on ", device_);
#endif
    } else {
      TORCH_CHECK(device_.is_cpu(), "FusedAdamWEMAPlan: unsupported device ", device_);
    }
  }

  void step(const OptList& grads, const at::Tensor& lr, const at::Tensor& found_inf,
            const std::optional<at::Tensor>& grad_scale, const at::Tensor& ema_weight) {
    TORCH_CHECK(grads.size() == descs_.size(), "FusedAdamWEMAPlan.step: ", grads.size(),
                " gradients for ", descs_.size(), " tensors");
    scalar(lr, "lr");
    scalar(found_inf, "found_inf");
    scalar(ema_weight, "ema_weight");
    const bool scaled = grad_scale.has_value() && grad_scale->defined();
    if (scaled) scalar(*grad_scale, "grad_scale");
    check_unchanged();
    std::vector<const float*> now(descs_.size(), nullptr);
    for (size_t i = 0; i < descs_.size(); ++i) {
      const bool has = grads[i].has_value() && grads[i]->defined();
      if (descs_[i].m == nullptr) continue;   // frozen: its gradient is not read
      TORCH_CHECK(has, "FusedAdamWEMAPlan.step: trained tensor ", i, " has no gradient");
      const at::Tensor& g = *grads[i];
      TORCH_CHECK(g.device() == device_ && g.scalar_type() == at::kFloat &&
                      g.is_contiguous() && g.numel() == descs_[i].numel,
                  "FusedAdamWEMAPlan.step: gradient ", i, " must be a contiguous float32 "
                  "tensor of ", descs_[i].numel, " elements on ", device_);
      now[i] = g.data_ptr<float>();
    }
    if (descs_.empty()) return;
    if (device_.is_cuda()) {
#ifdef WITH_CUDA
      // also when a capture left the table pending and commit() never ran (the capture
      // failed): the eager gradients may sit at the capture-time addresses, the table not
      if (now != grads_ || pending_) {
        grads_ = now;
        if (!adamw_ema_capturing(device_)) {
          upload_grads();
        } else {
          pending_ = true;   // uploaded by commit(), after the capture
        }
      }
      fused_adamw_ema_cuda(table_.data_ptr(), grad_table_.data_ptr(),
                           static_cast<int64_t>(descs_.size()),
                           static_cast<int64_t>(chunk_entries_.size()), hyper_,
                           lr.data_ptr<float>(), scaled ? grad_scale->data_ptr<float>() : nullptr,
                           found_inf.data_ptr<float>(), ema_weight.data_ptr<float>(), device_);
#endif
    } else {
      grads_ = now;
      if (found_inf.item<float>() == 0.0f) {
        const float gs = scaled ? grad_scale->item<float>() : 1.0f;
        fused_adamw_ema_cpu(descs_, grads_, hyper_, static_cast<double>(lr.item<float>()),
                            scaled ? &gs : nullptr, ema_weight.item<float>());
      }
    }
    for (auto& t : params_) t.unsafeGetTensorImpl()->bump_version();
    for (auto& t : ema_) t.unsafeGetTensorImpl()->bump_version();
    for (auto& t : held_) t.unsafeGetTensorImpl()->bump_version();
  }

  // Upload gradient pointers that a step() seen during a CUDA-graph capture left pending.
  bool commit() {
    if (!pending_) return false;
#ifdef WITH_CUDA
    upload_grads();
#endif
    return true;
  }

  int64_t num_tensors() const { return static_cast<int64_t>(descs_.size()); }
  int64_t num_trained() const { return n_trained_; }
  int64_t num_chunks() const { return static_cast<int64_t>(chunk_entries_.size()); }
  bool pending() const { return pending_; }

 private:
  // read in the kernel through its pointer: a CPU scalar for a CUDA plan would fault there
  void scalar(const at::Tensor& t, const char* what) const {
    TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat && t.device() == device_,
                "FusedAdamWEMAPlan.step: ", what, " must be a one-element float32 tensor on ",
                device_, ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  }

#ifdef WITH_CUDA
  void upload_grads() {
    at::Tensor host = at::empty({grad_table_.numel()}, at::dtype(at::kLong));
    auto* w = host.data_ptr<int64_t>();
    for (int64_t i = 0; i < host.numel(); ++i) {
      w[i] = i < static_cast<int64_t>(grads_.size())
                 ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(grads_[i])) : 0;
    }
    adamw_ema_upload(grad_table_, host);
    pending_ = false;
  }
#endif

  void check_unchanged() const {
    for (size_t i = 0; i < descs_.size(); ++i) {
      TORCH_CHECK(params_[i].data_ptr() == static_cast<void*>(descs_[i].p) &&
                      ema_[i].data_ptr() == static_cast<void*>(descs_[i].ema),
                  "FusedAdamWEMAPlan.step: tensor ", i, " no longer has the storage the plan "
                  "was built with; build a new plan after replacing tensors");
    }
  }

  std::vector<at::Tensor> params_, ema_, held_;   // held so the pointers stay valid
  std::vector<AdamWEmaTensorDesc> descs_;
  std::vector<int64_t> chunk_entries_;
  std::vector<const float*> grads_;
  AdamWHyper hyper_;
  at::Tensor table_, grad_table_;
  c10::Device device_{c10::kCPU};
  int64_t n_trained_ = 0;
  bool pending_ = false;
};

}  // namespace sra_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sra-fast C++/CUDA extension: multi-tensor fused EMA and AdamW+EMA updates";
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
  py::class_<sra_fast::FusedAdamWEMAPlan>(m, "FusedAdamWEMAPlan", py::module_local())
      .def(py::init<std::vector<at::Tensor>, sra_fast::FusedAdamWEMAPlan::OptList,
                    sra_fast::FusedAdamWEMAPlan::OptList, sra_fast::FusedAdamWEMAPlan::OptList,
                    std::vector<at::Tensor>, sra_fast::FusedAdamWEMAPlan::OptList, double,
                    double, double, double>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"),
           py::arg("ema"), py::arg("shadow"), py::arg("beta1"), py::arg("beta2"),
           py::arg("eps"), py::arg("weight_decay"))
      .def("step", &sra_fast::FusedAdamWEMAPlan::step, py::arg("grads"), py::arg("lr"),
           py::arg("found_inf"), py::arg("grad_scale"), py::arg("ema_weight"),
           py::call_guard<py::gil_scoped_release>())
      .def("commit", &sra_fast::FusedAdamWEMAPlan::commit)
      .def_property_readonly("num_tensors", &sra_fast::FusedAdamWEMAPlan::num_tensors)
      .def_property_readonly("num_trained", &sra_fast::FusedAdamWEMAPlan::num_trained)
      .def_property_readonly("num_chunks", &sra_fast::FusedAdamWEMAPlan::num_chunks)
      .def_property_readonly("pending", &sra_fast::FusedAdamWEMAPlan::pending);
}
