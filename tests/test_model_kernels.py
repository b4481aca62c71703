"""A whole SiT-S/2 forward + backward (with SRA's projected hidden state and alignment loss)
through the Triton kernels agrees with the reference ops within bf16 tolerance.

The house tolerance rule, applied to the whole model: under bf16 autocast, each output and
every parameter gradient of the `triton` backend is compared with an fp32 run of the `ref`
backend; its normwise relative error must be at most 2x that of the `ref` backend under the
same bf16 autocast, plus 1e-3. CPU runs through the Triton interpreter with SiT-S/2's width,
heads and patch but 2 blocks on 8x8 latents; CUDA runs the real SiT-S/2 (12 blocks, 32x32
latents, 256 tokens)."""
import pytest
import torch

from sra_fast import ops
from sra_fast.models import SiT, SiT_models
from sra_fast.ops.attention import use_attention_backend

pytest.importorskip("sra_fast.kernels")


def _model(device):
    torch.manual_seed(0)
    if device == "cuda":
        m = SiT_models["SiT-S/2"](input_size=32, num_classes=10)
    else:   # SiT-S/2's width, heads and patch; fewer blocks and tokens for the interpreter
        m = SiT(input_size=8, patch_size=2, hidden_size=384, depth=2, num_heads=6,
                num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # random adaLN/final weights (zero-initialised) so every path counts
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.05))
    return m.to(device)


def _run(m, backend, bf16, x, t, y, hidden_block):
    m.zero_grad(set_to_none=True)
    dev = x.device.type
    ctx = torch.autocast(dev, dtype=torch.bfloat16) if bf16 else torch.autocast(dev, enabled=False)
    with ops.use_backend(backend), ctx:
        out, hs = m(x, t, y, hidden_block=hidden_block)
        target = torch.randn(hs.shape, generator=torch.Generator().manual_seed(2)).to(hs.device)
        align = ops.align_loss(hs, target.to(hs.dtype), "cos").mean()
        loss = out.float().square().mean() + 0.5 * align
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in m.named_parameters()
             if p.grad is not None}
    return {"out": out.detach().float(), "hidden": hs.detach().float(), **grads}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_sit_s2_forward_backward_triton_matches_ref_in_bf16(kernel_device):
    m = _model(kernel_device)
    N = 4 if kernel_device == "cuda" else 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 4, m.input_size, m.input_size, generator=g).to(kernel_device)
    t = torch.rand(N, generator=g).to(kernel_device)
    y = torch.randint(0, 10, (N,), generator=g).to(kernel_device)
    k = 2 if kernel_device != "cuda" else 4
    with use_attention_backend("math" if kernel_device == "cpu" else "auto"):
        hp = _run(m, "ref", False, x, t, y, k)          # fp32 reference
        lp = _run(m, "ref", True, x, t, y, k)           # PyTorch's own bf16 error
        kr = _run(m, "triton", True, x, t, y, k)        # ours
    assert hp.keys() == lp.keys() == kr.keys()
    assert len(hp) == 2 + sum(1 for p in m.parameters() if p.requires_grad)
    bad = []
    for name in hp:
        assert torch.isfinite(kr[name]).all(), name
        e_k, e_t = _rel(kr[name], hp[name]), _rel(lp[name], hp[name])
        if e_k > 2 * e_t + 1e-3:
            bad.append(f"{name}: triton {e_k:.2e} vs torch bf16 {e_t:.2e}")
    assert not bad, bad
