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


def test_model_host_side_makes_no_copies(kernel_device, monkeypatch):
    """Around the kernels, a training forward + backward (and the teacher's forward) issue no
    copy ops: the residual stream is contiguous from the embedding, and the blocks'
    shift/scale/gate (row-strided views of one modulation) reach the kernels as they are.
    Ops inside the interpreter's kernel launches are not counted (on CUDA there are none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    depth = [0]
    if kernel_device == "cpu":
        from triton.runtime.interpreter import InterpretedFunction
        real_run = InterpretedFunction.run

        def run(self, *a, **k):
            depth[0] += 1
            try:
                return real_run(self, *a, **k)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(InterpretedFunction, "run", run)

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            # tensors of the blocks' width (the output's unpatchify copy is not one)
            if depth[0] == 0 and name in ("clone", "copy_", "contiguous") \
                    and any(s and s[-1] % 64 == 0 for s in shapes):
                self.seen.append((name, shapes))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    m = SiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4,
            num_classes=10).to(kernel_device)
    x = torch.randn(2, 4, 8, 8, device=kernel_device)
    t = torch.rand(2, device=kernel_device)
    y = torch.tensor([1, 2], device=kernel_device)
    rec = Copies()
    with ops.use_backend("triton"), torch.autocast(kernel_device, dtype=torch.bfloat16):
        with rec:
            out, hs = m(x, t, y, hidden_block=1)
            (out.float().square().mean() + hs.float().square().mean()).backward()
            with torch.no_grad():
                m.forward_hidden(x, t, y, 2)
    assert not rec.seen, rec.seen
