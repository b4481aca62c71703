"""Building blocks of SiT/DiT with the released state-dict names.

Module and parameter names are those of the released SiT/DiT/REPA/SRA code (timm's
Attention/Mlp/PatchEmbed layouts) so released state dicts load with strict=True. The
element-wise chains go through sra_fast.ops (the backend switch), attention through
sra_fast.ops.attention.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from .. import ops
from ..ops.attention import attention


# ----------------------------------------------------------------------------- embeddings
def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) fixed 2-D sin-cos embedding, as in MAE/DiT."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


class PatchEmbed(nn.Module):
    """Image (N,C,H,W) -> tokens (N,T,D) with a stride-p conv (timm's `proj`)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, the model was built for "
                             f"{self.img_size}x{self.img_size} latents")
        return self.proj(x).flatten(2).transpose(1, 2)


_FREQS: dict = {}


def _timestep_freqs(half: int, max_period: float, device) -> torch.Tensor:
    """exp(-log(max_period) * i / half), computed on the CPU and moved, as the released code
    does (a GPU's exp may differ in the last bit), once per device: no per-call host copy,
    so the step stays free of host syncs (the first call, in a warm-up, fills the cache).
    Under torch.compile it is computed in the graph, on the device."""
    device = torch.device(device)
    if torch.compiler.is_compiling():
        return torch.exp(-math.log(max_period)
                         * torch.arange(half, dtype=torch.float32, device=device) / half)
    key = (half, float(max_period), device)
    freqs = _FREQS.get(key)
    if freqs is None:
        with torch.inference_mode(False), torch.no_grad():   # a plain tensor, wherever made
            freqs = torch.exp(-math.log(max_period)
                              * torch.arange(half, dtype=torch.float32) / half).to(device)
        _FREQS[key] = freqs
    return freqs


class TimestepEmbedder(nn.Module):
    """Scalar t -> sinusoidal(256: cos first, then sin) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: float = 10000):
        half = dim // 2
        freqs = _timestep_freqs(half, max_period, t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; id `num_classes` is the null (unconditional) class.

    Label dropout is NOT applied in forward: the objective draws it once per step
    (`drop_labels`) so the student and the EMA teacher see the same dropped labels.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def drop_labels(self, labels, generator=None):
        if self.dropout_prob <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels):
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------- block parts
class Attention(nn.Module):
    """timm-layout multi-head self-attention: qkv (3D,D) with heads contiguous inside q, k, v."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        # The same (B, H, T, d) views of the qkv projection as timm's permute(2, 0, 3, 1, 4)
        # then unbind(0) (same strides, so the same forward bits), taken in the order whose
        # backward stacks dq, dk, dv straight into qkv's layout: timm's order stacks them
        # along a new leading axis and then copies that into qkv's layout, one more read and
        # write of the (B, T, 3D) gradient per block (tests/test_models.py counts the copies).
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        q, k = self.q_norm(q), self.k_norm(k)
        o = attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm's Mlp names)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return ops.mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class ProjectorHead(nn.Module):
    """SRA's `ap_head`: Linear(D,2D) -> SiLU -> Linear(2D,D), applied to the student only."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.linear2 = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x):
        return ops.projector(x, self.linear1.weight, self.linear1.bias,
                             self.linear2.weight, self.linear2.bias)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (same math in SiT and DiT).

    x = x + gate_msa * attn(modulate(LN(x), shift_msa, scale_msa))
    x = x + gate_mlp * mlp(modulate(LN(x), shift_mlp, scale_mlp))
    The middle residual and the second LayerNorm-modulate are one fused op. `run` also fuses
    the final residual with the NEXT block's first LayerNorm-modulate when the model asks.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c):
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (N, D)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x, c):
        mods = self.modulation(c)
        return self.run(x, ops.adaln_norm(x, mods[0], mods[1]), mods)[0]

    def run(self, x, x_in, mods, next_norm=None):
        """The block on the residual stream x, given its first sub-layer input
        x_in = modulate(LN(x), shift_msa, scale_msa) and its modulation `mods`.

        Returns (x_out, next_in). With next_norm = (shift, scale) of whatever comes next, the
        final gated residual and that LayerNorm-modulate are one fused op (one pass over the
        stream instead of two, forward and backward) and next_in is its output; else None.
        """
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        a = self.attn(x_in)
        x, m_in = ops.gated_residual_adaln_norm(x, gate_msa, a, shift_mlp, scale_mlp)
        m = self.mlp(m_in)
        if next_norm is None:
            return ops.gated_residual(x, gate_mlp, m), None
        return ops.gated_residual_adaln_norm(x, gate_mlp, m, *next_norm)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, c):
        """(shift, scale), each (N, D)."""
        return self.adaLN_modulation(c).chunk(2, dim=1)

    def forward(self, x, c):
        shift, scale = self.modulation(c)
        return self.linear(ops.adaln_norm(x, shift, scale))
