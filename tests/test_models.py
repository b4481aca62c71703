"""Models: released layout, same math as an independent implementation, hidden-state access."""
import math

import pytest
import torch

from sra_fast import ops
from sra_fast.models import ALL_MODELS, DiT, SiT, SiT_models, build_model

from released_style import ReleasedStyleDiT, pos_embed_2d, timestep_embedding

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def randomize(model, gen):
    """Replace the zero adaLN/final init by random weights so every path matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.dim() > 1 else 0.05))
    return model


def expected_shapes(name, input_size=32, num_classes=1000, C=4):
    fam, rest = name.split("-")
    size, p = rest.split("/")
    depth, D, H = SIZES[size]
    p = int(p)
    c_out = 2 * C if fam == "DiT" else C
    T = (input_size // p) ** 2
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),
        "ap_head.linear1.weight": (2 * D, D), "ap_head.linear1.bias": (2 * D,),
        "ap_head.linear2.weight": (D, 2 * D), "ap_head.linear2.bias": (D,),
        "final_layer.linear.weight": (p * p * c_out, D), "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    return shapes, c_out, depth


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_registry_state_dict_layout_and_shapes(name):
    # meta device: the full XL layout without allocating 675M parameters
    with torch.device("meta"):
        m = build_model(name, input_size=32)
        shapes, c_out, depth = expected_shapes(name)
        got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert got == shapes
        assert m.depth == depth
        x = torch.empty(2, 4, 32, 32)
        out = m(x, torch.empty(2), torch.zeros(2, dtype=torch.long))
        assert tuple(out.shape) == (2, c_out, 32, 32)


def test_parameter_counts_and_order_match_the_released_models():
    """Anchors independent of the shape table above: the released models' parameter counts
    (without SRA's ap_head, which adds 4D^2 + 3D), and the parameter ORDER, which the released
    train.py's AdamW(model.parameters()) indexes its state by (our checkpoints' `opt` is
    written in that order)."""
    def count(m, head=False):
        return sum(p.numel() for n, p in m.named_parameters()
                   if head or not n.startswith("ap_head."))
    with torch.device("meta"):
        dit, sit = build_model("DiT-XL/2", input_size=32), build_model("SiT-XL/2", input_size=32)
        b2 = build_model("SiT-B/2", input_size=32)
    assert count(dit) == 675_129_632
    assert count(sit) == 675_111_184
    assert count(b2) == 130_500_112
    assert count(sit, head=True) - count(sit) == 4 * 1152 ** 2 + 3 * 1152
    for m in (dit, sit):
        tops = []
        for n, _ in m.named_parameters():
            top = n.split(".")[0]
            if not tops or tops[-1] != top:
                tops.append(top)
        assert tops == ["pos_embed", "x_embedder", "t_embedder", "y_embedder", "blocks",
                        "ap_head", "final_layer"]
        blocks = [n for n, _ in m.named_parameters() if n.startswith("blocks.0.")]
        assert blocks == [f"blocks.0.{k}" for k in (
            "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
            "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")]


@pytest.mark.parametrize("name", ["SiT-S/2", "SiT-S/4", "SiT-S/8", "DiT-S/2", "DiT-S/8"])
def test_small_models_run_for_real(name):
    # the released SiT-S constructors are broken (final layer built for width 768); ours run
    m = build_model(name, input_size=16, num_classes=10).eval()
    x = torch.randn(3, 4, 16, 16)
    t = torch.rand(3) if name.startswith("SiT") else torch.randint(0, 1000, (3,))
    out = m(x, t, torch.randint(0, 11, (3,)))
    assert out.shape == (3, 8 if name.startswith("DiT") else 4, 16, 16)
    assert torch.isfinite(out).all()


def test_initialisation_matches_released_rules():
    m = SiT_models["SiT-S/2"](input_size=16, num_classes=10)
    for b in m.blocks:
        assert b.adaLN_modulation[1].weight.abs().sum() == 0
        assert b.adaLN_modulation[1].bias.abs().sum() == 0
        assert b.attn.qkv.bias.abs().sum() == 0
        w = b.attn.qkv.weight
        bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5     # xavier uniform
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert m.final_layer.linear.weight.abs().sum() == 0
    assert abs(m.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert abs(m.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    torch.testing.assert_close(m.pos_embed.data, pos_embed_2d(384, 8), rtol=0, atol=1e-6)
    assert not m.pos_embed.requires_grad
    # zero-initialised network output
    out = m(torch.randn(2, 4, 16, 16), torch.rand(2), torch.tensor([1, 2]))
    assert out.abs().max() == 0


def test_timestep_embedding_cos_then_sin():
    from sra_fast.models.layers import TimestepEmbedder
    t = torch.tensor([0.0, 0.3, 1.0, 500.0])
    torch.testing.assert_close(TimestepEmbedder.timestep_embedding(t, 256), timestep_embedding(t),
                               rtol=1e-5, atol=1e-5)


def _released_timestep_embedding(t, dim=256, max_period=10000):
    """The released code's function, verbatim in its arithmetic: freqs on the CPU, moved."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half,
                                                          dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_timestep_embedding_is_bitwise_the_released_one(device):
    """Bitwise, on the GPU too: the frequencies come from the CPU, as in the released code (a
    GPU exp may round differently; DiT's integer t up to 999 would show it in the sin/cos)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from sra_fast.models.layers import TimestepEmbedder
    for t in (torch.rand(64), torch.arange(1000).float()):
        t = t.to(device)
        assert torch.equal(TimestepEmbedder.timestep_embedding(t, 256),
                           _released_timestep_embedding(t))


@pytest.mark.parametrize("kind", ["SiT", "DiT"])
def test_b2_outputs_match_independent_implementation(kind):
    gen = torch.Generator().manual_seed(1)
    cls = SiT if kind == "SiT" else DiT
    # B/2 width and heads, fewer blocks to keep CPU time small
    m = cls(input_size=16, patch_size=2, hidden_size=768, depth=4, num_heads=12,
            num_classes=1000).eval()
    randomize(m, gen)
    c_out = 8 if kind == "DiT" else 4
    ref = ReleasedStyleDiT(16, 2, 4, 768, 4, 12, 1000, c_out)
    ref.load_state_dict(m.state_dict(), strict=True)      # same keys, same shapes
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.rand(2, generator=gen) if kind == "SiT" else torch.randint(0, 1000, (2,), generator=gen)
    y = torch.tensor([3, 1000])                             # a class and the null class
    with torch.no_grad(), ops.use_backend("ref"):
        out, h = m(x, t, y, hidden_block=2)
        ref_out, ref_h = ref(x, t, y, hidden_block=2)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)


def test_qk_norm_outputs_match_independent_implementation():
    """REPA's qk_norm option: a per-head LayerNorm (affine, eps 1e-5) on q and k, with
    non-trivial norm weights so a skipped or misplaced norm shows."""
    gen = torch.Generator().manual_seed(2)
    m = SiT(input_size=8, patch_size=2, hidden_size=128, depth=2, num_heads=4, num_classes=10,
            qk_norm=True).eval()
    randomize(m, gen)
    with torch.no_grad():   # norm gains of a few units: sharp attention, where the norm shows
        for name, p in m.named_parameters():
            if "_norm.weight" in name:
                p.copy_(2.0 + torch.rand(p.shape, generator=gen))
    ref = ReleasedStyleDiT(8, 2, 4, 128, 2, 4, 10, 4, qk_norm=True)
    ref.load_state_dict(m.state_dict(), strict=True)
    assert any("q_norm" in k for k in m.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, generator=gen), \
        torch.tensor([3, 10])
    with torch.no_grad(), ops.use_backend("ref"):
        out, h = m(x, t, y, hidden_block=1)
        ref_out, ref_h = ref(x, t, y, hidden_block=1)
        plain = ReleasedStyleDiT(8, 2, 4, 128, 2, 4, 10, 4)
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if "_norm" not in k})
        assert not torch.allclose(plain(x, t, y), out, atol=1e-3)   # the norms matter here
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)


def test_full_b2_depth_matches_independent_implementation():
    gen = torch.Generator().manual_seed(2)
    m = SiT_models["SiT-B/2"](input_size=16, num_classes=1000).eval()
    randomize(m, gen)
    ref = ReleasedStyleDiT(16, 2, 4, 768, 12, 12, 1000, 4)
    ref.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t, y = torch.rand(2, generator=gen), torch.tensor([7, 999])
    with torch.no_grad():
        a, b = m(x, t, y), ref(x, t, y)
    rel = (a - b).norm() / b.norm()
    assert rel < 1e-5, rel


def test_teacher_stops_at_block_with_exact_hidden_state():
    gen = torch.Generator().manual_seed(3)
    m = randomize(SiT_models["SiT-S/2"](input_size=16, num_classes=10).eval(), gen)
    x, t, y = torch.randn(2, 4, 16, 16, generator=gen), torch.rand(2, generator=gen), torch.tensor([1, 2])
    captured = {}
    m.blocks[4].register_forward_hook(lambda mod, i, o: captured.setdefault("h", o.clone()))
    ran = []
    for j in range(5, 12):
        m.blocks[j].register_forward_hook(lambda mod, i, o, j=j: ran.append(j))
    with torch.no_grad():
        m(x, t, y)
        assert len(ran) == 7
        ran.clear()
        h = m.forward_hidden(x, t, y, 5)
    assert ran == []                       # blocks after 5 never ran
    assert torch.equal(h, captured["h"])   # bitwise the full pass's hidden state


def test_student_hidden_goes_through_projector_head():
    gen = torch.Generator().manual_seed(4)
    m = randomize(SiT_models["SiT-S/2"](input_size=16, num_classes=10).eval(), gen)
    x, t, y = torch.randn(2, 4, 16, 16, generator=gen), torch.rand(2, generator=gen), torch.tensor([1, 2])
    with torch.no_grad():
        out, hs = m(x, t, y, hidden_block=3)
        raw = m.forward_hidden(x, t, y, 3)
        torch.testing.assert_close(hs, m.ap_head.linear2(torch.nn.functional.silu(m.ap_head.linear1(raw))))
        assert torch.equal(out, m(x, t, y))


def test_original_sit_learn_sigma_returns_first_half():
    m = SiT_models["SiT-S/4"](input_size=16, num_classes=10, learn_sigma=True).eval()
    assert m.final_layer.linear.weight.shape[0] == 4 * 4 * 8
    randomize(m, torch.Generator().manual_seed(5))
    out = m(torch.randn(1, 4, 16, 16), torch.rand(1), torch.tensor([0]))
    assert out.shape == (1, 4, 16, 16)


def test_qk_norm_layout():
    m = SiT_models["SiT-S/2"](input_size=16, num_classes=10, qk_norm=True)
    sd = m.state_dict()
    assert sd["blocks.0.attn.q_norm.weight"].shape == (64,)
    assert sd["blocks.0.attn.k_norm.bias"].shape == (64,)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown model 'SiT-Q/2'.*SiT-XL/2"):
        build_model("SiT-Q/2")
    m = SiT_models["SiT-S/2"](input_size=16, num_classes=10)
    x, t, y = torch.randn(1, 4, 16, 16), torch.rand(1), torch.tensor([0])
    for k in (0, 13, -1):
        with pytest.raises(ValueError, match=r"outside 1\.\.12"):
            m(x, t, y, hidden_block=k)
        with pytest.raises(ValueError, match=r"outside 1\.\.12"):
            m.forward_hidden(x, t, y, k)
    with pytest.raises(ValueError, match="built for 16x16"):
        m(torch.randn(1, 4, 32, 32), t, y)
    with pytest.raises(TypeError, match="unknown model arguments"):
        SiT_models["SiT-S/2"](input_sise=16)


def test_label_dropout_is_on_device_and_uses_null_class():
    m = SiT_models["SiT-S/8"](input_size=16, num_classes=10, class_dropout_prob=0.5)
    y = torch.arange(10).repeat(100)
    g = torch.Generator().manual_seed(0)
    d = m.drop_labels(y, g)
    frac = (d == 10).float().mean().item()
    assert 0.4 < frac < 0.6
    assert torch.equal(d[d != 10], y[d != 10])
    m0 = SiT_models["SiT-S/8"](input_size=16, num_classes=10, class_dropout_prob=0.0)
    assert m0.y_embedder.embedding_table.weight.shape[0] == 10
    assert torch.equal(m0.drop_labels(y, g), y)


def _count_ops(monkeypatch):
    """Counts the standalone adaln_norm / gated_residual calls the blocks make."""
    calls = {"adaln_norm": 0, "gated_residual": 0}
    for name in calls:
        orig = getattr(ops, name)

        def counted(*a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(ops, name, counted)
    return calls


def _fused_vs_blockwise(m, x, t, y, calls):
    """(out, hidden, grads) of m(x, t, y, hidden_block=2) fused, then blockwise (a no-op hook
    on block 1 makes the trunk run block by block), with the op counts of each."""
    results = []
    for blockwise in (False, True):
        handle = m.blocks[0].register_forward_hook(lambda mod, i, o: None) if blockwise else None
        for k in calls:
            calls[k] = 0
        m.zero_grad(set_to_none=True)
        out, hs = m(x, t, y, hidden_block=2)
        (out.square().mean() + hs.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((out.detach(), hs.detach(), grads, dict(calls)))
        if handle is not None:
            handle.remove()
    return results


def test_fused_block_boundaries_are_the_blockwise_model(monkeypatch):
    """Without hooks the trunk fuses each block's last gated residual with the next
    LayerNorm-modulate (the next block's, or the final layer's). Reference ops: bitwise the
    block-by-block model, outputs and gradients; and the fusion really happens."""
    gen = torch.Generator().manual_seed(11)
    m = randomize(SiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4,
                      num_classes=10), gen)
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, generator=gen), torch.tensor([1, 10])
    calls = _count_ops(monkeypatch)
    with ops.use_backend("ref"):
        (o1, h1, g1, c1), (o2, h2, g2, c2) = _fused_vs_blockwise(m, x, t, y, calls)
        assert c1 == {"adaln_norm": 1, "gated_residual": 0}      # every boundary fused
        assert c2 == {"adaln_norm": 4, "gated_residual": 3}      # depth + final layer
        assert torch.equal(o1, o2) and torch.equal(h1, h2)
        assert g1.keys() == g2.keys() and len(g1) == len(list(m.parameters())) - 1
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-6, atol=1e-7, msg=n)
        for k in calls:
            calls[k] = 0
        with torch.no_grad():
            h_stop = m.forward_hidden(x, t, y, 2)
            assert calls == {"adaln_norm": 1, "gated_residual": 1}   # the stop block's own
            assert torch.equal(m.ap_head(h_stop), h1)       # h1 is the student's ap_head(h)


@pytest.mark.triton_interpret
def test_fused_block_boundaries_with_triton_kernels(monkeypatch):
    """The same through the Triton kernels (CPU: interpreter): the fused op normalizes h in
    fp32 before rounding, so agreement is to fp32 rounding, not bitwise."""
    pytest.importorskip("sra_fast.kernels")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("no device for the Triton kernels")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(12)
    m = randomize(SiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4,
                      num_classes=10), gen).to(dev)
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, generator=gen), torch.tensor([1, 10])
    calls = _count_ops(monkeypatch)
    with ops.use_backend("triton"):
        assert ops._kernel("gated_residual_adaln_norm", x.to(dev)) is not None  # kernels run
        (o1, h1, g1, c1), (o2, h2, g2, _) = _fused_vs_blockwise(m, x.to(dev), t.to(dev),
                                                                y.to(dev), calls)
    assert c1 == {"adaln_norm": 1, "gated_residual": 0}
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-6)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)


def test_hooks_on_blocks_and_final_layer_still_fire():
    gen = torch.Generator().manual_seed(13)
    m = randomize(SiT(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4,
                      num_classes=10), gen).eval()
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, generator=gen), torch.tensor([1, 2])
    seen = []
    m.final_layer.register_forward_hook(lambda mod, i, o: seen.append(("final", o.shape)))
    with torch.no_grad():
        m(x, t, y)
    assert seen == [("final", torch.Size([2, 16, 16]))]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_views_are_timm_order_bitwise_with_one_gradient_copy(qk_norm):
    """The block's q, k, v are timm's views (permute(2, 0, 3, 1, 4).unbind(0)) taken in the
    other order: the same forward and gradients to the bit, and a backward that writes the
    (B, T, 3D) qkv gradient once (one stack) instead of stacking and then copying."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from sra_fast.models.layers import Attention
    from sra_fast.ops.attention import attention

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def timm_order(mod, x):
        B, T, C = x.shape
        qkv = mod.qkv(x).reshape(B, T, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = mod.q_norm(q), mod.k_norm(k)
        return mod.proj(attention(q, k, v).transpose(1, 2).reshape(B, T, C))

    torch.manual_seed(3)
    mod = Attention(64, 4, qk_norm=qk_norm)
    if qk_norm:
        with torch.no_grad():
            for norm in (mod.q_norm, mod.k_norm):
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.normal_()
    x = torch.randn(3, 10, 64)
    g = torch.randn(3, 10, 64)
    for dtype in (torch.float32, torch.bfloat16):
        grads = []
        for f in (mod, lambda t: timm_order(mod, t)):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = f(xi)
            rec = Ops()
            with rec:
                out.backward(g.to(out.dtype))
            grads.append((out.detach(), xi.grad, [p.grad.clone() for p in mod.parameters()],
                          rec.names))
            mod.zero_grad(set_to_none=True)
        (o1, gx1, gp1, ops1), (o2, gx2, gp2, ops2) = grads
        assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
        assert all(torch.equal(a, b) for a, b in zip(gp1, gp2))
        assert ops1.count("stack") == 1 and "clone" not in ops1, ops1
        assert "clone" in ops2   # what the timm order costs (this test would notice a change)


def test_residual_stream_starts_contiguous(monkeypatch):
    """The patch embedding comes out transposed ((N, D, T) memory); summed with pos_embed
    first, the residual stream is contiguous from the start, so the first block's fused ops
    (whose kernels need contiguous rows) and LayerNorms do not each copy it."""
    seen = []
    real = ops.adaln_norm

    def spy(x, shift, scale, *a, **k):
        seen.append(x.is_contiguous())
        return real(x, shift, scale, *a, **k)

    monkeypatch.setattr(ops, "adaln_norm", spy)
    m = SiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x, t, y, hidden_block=1)
        m.forward_hidden(x, t, y, 1)
    assert seen and all(seen), seen
    emb = m.x_embedder(x)
    assert not emb.is_contiguous()   # what the order works around
    assert torch.equal(m.pos_embed + emb, emb + m.pos_embed)
