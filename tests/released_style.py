"""An independent, deliberately plain SiT/DiT written from the formulas of sra-method.md.

It mirrors the released code's module structure (so the same state-dict keys load into it
with strict=True) but shares no code with sra_fast: its own LayerNorm, attention, GELU(tanh),
timestep and position embeddings. Tests load our models' weights into it and compare outputs.
"""
import math

import torch
import torch.nn as nn


def layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def timestep_embedding(t, dim=256, max_period=10000):
    half = dim // 2
    # the released code forms the arguments in fp32; so does this reference
    out = torch.zeros(t.shape[0], dim, dtype=torch.float32)
    for j in range(half):
        e = torch.tensor(-math.log(max_period), dtype=torch.float32) * j / half
        f = torch.exp(e)
        arg = (t.float() * f).double()
        out[:, j] = torch.cos(arg).float()
        out[:, half + j] = torch.sin(arg).float()
    return out


def pos_embed_2d(D, grid):
    """Row-major token order; first half of D encodes the row (h), second half the column."""
    pe = torch.zeros(grid * grid, D, dtype=torch.float64)
    quarter = D // 4
    for i in range(grid):          # row
        for j in range(grid):      # column
            n = i * grid + j
            for d in range(quarter):
                w = 1.0 / 10000 ** (d / quarter)
                # MAE's convention: emb_h uses grid[0] which (meshgrid(w, h)) is the column
                pe[n, d] = math.sin(j * w)
                pe[n, quarter + d] = math.cos(j * w)
                pe[n, 2 * quarter + d] = math.sin(i * w)
                pe[n, 3 * quarter + d] = math.cos(i * w)
    return pe.float().unsqueeze(0)


class Lin(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(o, i))
        self.bias = nn.Parameter(torch.empty(o))

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class Seq(nn.Module):
    """Holds a Linear at index 1 (adaLN_modulation.1) or at 0 and 2 (t_embedder.mlp)."""

    def __init__(self, mods: dict):
        super().__init__()
        for k, m in mods.items():
            self.add_module(str(k), m)


class PatchEmb(nn.Module):
    def __init__(self, C, D, p):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(D, C, p, p))
        self.proj.bias = nn.Parameter(torch.empty(D))
        self.p = p

    def forward(self, x):
        N, C, H, W = x.shape
        p = self.p
        patches = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(N, (H // p) * (W // p), C * p * p)
        return patches @ self.proj.weight.reshape(self.proj.weight.shape[0], -1).t() + self.proj.bias


class HeadNorm(nn.Module):
    """timm's qk_norm: LayerNorm over each head's features, affine, eps 1e-5."""

    def __init__(self, hd):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hd))
        self.bias = nn.Parameter(torch.zeros(hd))

    def forward(self, z):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class Block(nn.Module):
    def __init__(self, D, H, qk_norm=False):
        super().__init__()
        self.H = H
        self.attn = nn.Module()
        self.attn.qkv = Lin(D, 3 * D)
        self.qk_norm = qk_norm
        if qk_norm:   # after the head split, before the scaled dot product
            self.attn.q_norm = HeadNorm(D // H)
            self.attn.k_norm = HeadNorm(D // H)
        self.attn.proj = Lin(D, D)
        self.mlp = nn.Module()
        self.mlp.fc1 = Lin(D, 4 * D)
        self.mlp.fc2 = Lin(4 * D, D)
        self.adaLN_modulation = Seq({1: Lin(D, 6 * D)})

    def attention(self, x):
        N, T, D = x.shape
        hd = D // self.H
        qkv = self.attn.qkv(x)
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        q = q.reshape(N, T, self.H, hd).transpose(1, 2)
        k = k.reshape(N, T, self.H, hd).transpose(1, 2)
        v = v.reshape(N, T, self.H, hd).transpose(1, 2)
        if self.qk_norm:
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (w @ v).transpose(1, 2).reshape(N, T, D)
        return self.attn.proj(o)

    def forward(self, x, c):
        m = getattr(self.adaLN_modulation, "1")(torch.nn.functional.silu(c))
        s1, sc1, g1, s2, sc2, g2 = m.chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attention(modulate(layer_norm(x), s1, sc1))
        h = modulate(layer_norm(x), s2, sc2)
        x = x + g2.unsqueeze(1) * self.mlp.fc2(gelu_tanh(self.mlp.fc1(h)))
        return x


class ReleasedStyleDiT(nn.Module):
    def __init__(self, input_size, patch, C, D, depth, H, num_classes, c_out, drop_prob=0.1,
                 qk_norm=False):
        super().__init__()
        self.p, self.C, self.c_out = patch, C, c_out
        T = (input_size // patch) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, T, D), requires_grad=False)
        self.x_embedder = PatchEmb(C, D, patch)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = Seq({0: Lin(256, D), 2: Lin(D, D)})
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Module()
        self.y_embedder.embedding_table.weight = nn.Parameter(
            torch.empty(num_classes + int(drop_prob > 0), D))
        self.blocks = nn.ModuleList([Block(D, H, qk_norm) for _ in range(depth)])
        self.ap_head = nn.Module()
        self.ap_head.linear1 = Lin(D, 2 * D)
        self.ap_head.linear2 = Lin(2 * D, D)
        self.final_layer = nn.Module()
        self.final_layer.linear = Lin(D, patch * patch * c_out)
        self.final_layer.adaLN_modulation = Seq({1: Lin(D, 2 * D)})

    def forward(self, x, t, y, hidden_block=None):
        h = self.x_embedder(x) + self.pos_embed
        tm = self.t_embedder.mlp
        te = getattr(tm, "2")(torch.nn.functional.silu(getattr(tm, "0")(timestep_embedding(t))))
        c = te + self.y_embedder.embedding_table.weight[y]
        hidden = None
        for i, b in enumerate(self.blocks):
            h = b(h, c)
            if hidden_block == i + 1:
                z = self.ap_head.linear1(h)
                hidden = self.ap_head.linear2(z * torch.sigmoid(z))
        shift, scale = getattr(self.final_layer.adaLN_modulation, "1")(
            torch.nn.functional.silu(c)).chunk(2, dim=1)
        out = self.final_layer.linear(modulate(layer_norm(h), shift, scale))
        N, T, _ = out.shape
        g = int(math.isqrt(T))
        p, co = self.p, self.c_out
        img = torch.zeros(N, co, g * p, g * p)
        out = out.reshape(N, g, g, p, p, co)
        for i in range(g):
            for j in range(g):
                img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = out[:, i, j].permute(0, 3, 1, 2)
        return img if hidden is None else (img, hidden)
