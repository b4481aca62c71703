"""Analytic FLOPs of SiT/DiT forward passes and of one SRA training step, per image.

Counts matrix-multiply work only (2 FLOPs per multiply-add), as MFU figures do and as
torch.utils.flop_counter.FlopCounterMode does: patch-embedding conv, timestep MLP, every
adaLN / qkv / proj / MLP linear, both attention matmuls (QK^T and PV), the final layer and
SRA's projector head. Element-wise work (LayerNorm, modulate, softmax, GELU, the losses, the
optimizer and the EMA) is not counted: it is memory-bound and <1% of the FLOPs.

One SRA step per image = student forward + backward (backward = 2x forward for every matmul,
except the patch-embedding conv and the first timestep linear, whose inputs need no gradient:
1x) + projector head forward + backward + teacher forward through blocks 1..block_out_t (the
released code runs the whole teacher: `teacher_full=True`).

`attn_recompute=True` adds the QK^T recomputation of fused attention backward kernels
(flash/cuDNN/mem-efficient), which FlopCounterMode counts for SDPA (+0.5x the attention
forward of the student): with it, a released SiT-XL/2 step is the 961 GFLOP/image measured
with FlopCounterMode in docs (without: 957).

Checks: DiT-XL/2 forward at 256px = 118.6 GMAC (the DiT paper's "Gflops"); SiT-XL/2 SRA
8->20 = 889 GFLOP/image (teacher stopped at 20), 957 with the full teacher (961 counting
the attention-backward recomputation).
"""
from __future__ import annotations

import dataclasses
import re

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    depth: int
    hidden: int
    heads: int
    patch: int
    input_size: int = 32          # latent side (256px images -> 32)
    in_channels: int = 4
    out_channels: int = 4         # 8 for DiT / learn_sigma
    mlp_hidden: int | None = None  # 4 * hidden by default
    freq_dim: int = 256

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch) ** 2

    @property
    def mlp(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.hidden


def model_shape(model, input_size: int | None = None) -> ModelShape:
    """ModelShape of a built model, or of a name like 'SiT-XL/2' / 'DiT-B/4' (no weights
    are built; `input_size` is the latent side, 32 for 256px, 64 for 512px)."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        m = re.fullmatch(r"(SiT|DiT)-(S|B|L|XL)/(\d+)", model)
        if not m:
            raise ValueError(f"unknown model name {model!r}")
        depth, hidden, heads = _SIZES[m.group(2)]
        return ModelShape(depth, hidden, heads, int(m.group(3)), input_size or 32, 4,
                          8 if m.group(1) == "DiT" else 4, 4 * hidden)
    blk = model.blocks[0]
    return ModelShape(model.depth, model.hidden_size, model.num_heads, model.patch_size,
                      input_size or model.input_size, model.in_channels, model.out_channels,
                      blk.mlp.fc1.out_features, model.t_embedder.frequency_embedding_size)


def _parts(s: ModelShape) -> dict:
    """Forward multiply-adds per image of each part."""
    T, D = s.tokens, s.hidden
    return {
        "patch_embed": T * D * s.in_channels * s.patch * s.patch,
        "t_embed_in": s.freq_dim * D,          # input needs no gradient
        "t_embed_out": D * D,
        "block_linear": 6 * D * D + T * (3 * D * D + D * D + 2 * D * s.mlp),  # per block
        "block_attn": 2 * T * T * D,                                          # per block
        "final": 2 * D * D + T * D * s.patch * s.patch * s.out_channels,
        "head": T * (D * 2 * D + 2 * D * D),
    }


def forward_flops_per_image(model, upto_block: int | None = None, head: bool = False,
                            input_size: int | None = None) -> int:
    """FLOPs (2 per MAC) of one forward per image: the full network (final layer included),
    or blocks 1..upto_block without the final layer (the truncated teacher); `head` adds the
    projector head."""
    s = model_shape(model, input_size)
    p = _parts(s)
    k = s.depth if upto_block is None else upto_block
    macs = (p["patch_embed"] + p["t_embed_in"] + p["t_embed_out"]
            + k * (p["block_linear"] + p["block_attn"]))
    if upto_block is None:
        macs += p["final"]
    if head:
        macs += p["head"]
    return 2 * macs


def sra_step_flops_breakdown(model, block_out_s: int, block_out_t: int,
                             teacher_full: bool = False, attn_recompute: bool = False,
                             input_size: int | None = None) -> dict:
    """FLOPs per image of one SRA step, by part: student_fwd, student_bwd, head_fwd,
    head_bwd, teacher_fwd, total."""
    s = model_shape(model, input_size)
    p = _parts(s)
    for name, k in (("block_out_s", block_out_s), ("block_out_t", block_out_t)):
        if not 1 <= k <= s.depth:
            raise ValueError(f"{name} {k} is outside 1..{s.depth}")
    fwd = forward_flops_per_image(s)
    no_input_grad = 2 * (p["patch_embed"] + p["t_embed_in"])
    bwd = 2 * fwd - no_input_grad
    if attn_recompute:
        bwd += s.depth * p["block_attn"]      # 0.5 x (2 FLOPs x attention MACs)
    head = 2 * p["head"]
    teacher = forward_flops_per_image(s) if teacher_full else forward_flops_per_image(
        s, upto_block=block_out_t)
    out = {"student_fwd": fwd, "student_bwd": bwd, "head_fwd": head, "head_bwd": 2 * head,
           "teacher_fwd": teacher}
    out["total"] = sum(out.values())
    return out


def sra_step_flops_per_image(model, block_out_s: int, block_out_t: int,
                             teacher_full: bool = False, attn_recompute: bool = False,
                             input_size: int | None = None) -> int:
    """FLOPs per image of one SRA training step (see the module docstring)."""
    return sra_step_flops_breakdown(model, block_out_s, block_out_t, teacher_full,
                                    attn_recompute, input_size)["total"]


__all__ = ["ModelShape", "model_shape", "forward_flops_per_image", "sra_step_flops_per_image",
           "sra_step_flops_breakdown"]
