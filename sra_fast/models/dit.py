"""SiT and DiT: one diffusion transformer, two output conventions.

SiT (flow matching, REPA/SRA layout): `out_channels = in_channels` unless learn_sigma=True
(the original SiT checkpoints), in which case the network predicts 2C channels and forward
returns the first C, as the original SiT does.
DiT (DDPM): learn_sigma=True by default, forward returns all 2C channels (eps, variance).

Both carry SRA's projector head `ap_head`, applied only when the student's hidden state is
requested. Hidden-state access:
  forward(x, t, y)                      -> network output
  forward(x, t, y, hidden_block=k)      -> (output, ap_head(hidden after block k))   student
  forward_hidden(x, t, y, k)            -> hidden after block k, raw; blocks k+1.. never run
The student's hidden state goes through `forward` so a DDP wrapper sees the call.
Blocks are counted from 1: block k's output is the hidden state after the k-th block.

Block boundaries are fused: each block's final gated residual and the next block's (or the
final layer's) LayerNorm-modulate run as one op, which saves a read of the residual stream
per block in the forward, and in the backward the separate LayerNorm backward and the sum of
the stream's two gradients (three passes). When a block or the final layer carries hooks (or
is replaced by a wrapper), or a global module hook is set, the trunk runs block by block
through each module's __call__ instead, so hooks see exactly what they see in the released
code; both give the same numbers (bitwise with the reference ops; to fp32 rounding with the
kernels, which normalize the residual before rounding it).
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.modules import module as _nn_module

from .. import ops
from .layers import (DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, ProjectorHead,
                     TimestepEmbedder, get_2d_sincos_pos_embed)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(m: nn.Module) -> bool:
    return any(getattr(m, name, None) for name in _HOOK_DICTS)


def _global_module_hooks() -> bool:
    return any(getattr(_nn_module, f"_global{name}", None) for name in _HOOK_DICTS)


class DiffusionTransformer(nn.Module):
    learn_sigma_default = False
    return_sigma = True   # DiT returns eps and variance; SiT drops the variance half

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool | None = None,
                 qk_norm: bool = False, **unused):
        super().__init__()
        unknown = set(unused) - {"use_cfg", "z_dims", "encoder_depth", "projector_dim",
                                 "path_type", "fused_attn", "decoder_hidden_size"}
        if unknown:
            raise TypeError(f"unknown model arguments: {sorted(unknown)}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch {patch_size}")
        self.learn_sigma = self.learn_sigma_default if learn_sigma is None else learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if self.learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.input_size = input_size

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm)
                                     for _ in range(depth)])
        self.ap_head = ProjectorHead(hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # regional compilation (compile_blocks): the compiled DiTBlock.run the blocks run through
        self.block_run: Callable | None = None
        self.initialize_weights()

    @property
    def head_dim(self) -> int:
        """Attention head size (hidden_size / num_heads; 72 for XL)."""
        return self.hidden_size // self.num_heads

    def compile_blocks(self, compiler) -> None:
        """Regional compilation: every block runs through one compiled function,
        compiler(fn) (say lambda fn: torch.compile(fn, dynamic=False)), that takes the block
        as an argument, so dynamo compiles it once for all blocks (their weights are its
        inputs; a second graph for the last block, whose next LayerNorm-modulate is the final
        layer's): compile time does not grow with depth. Each block's backward is then an
        autograd node of its own, so gradient hooks (DDP's, the step's own all-reduce) fire
        block by block, overlapping the rest of the backward, as without compile. The
        embeddings, the modulations and the final layer stay eager. None: back to eager.
        Blocks that carry hooks (or modules in them do) or are wrapped run eagerly: dynamo
        does not guard on hooks, so one compiled block would stand for all. A copy of the model
        shares the compiled function (it holds no module); a teacher passes its own to
        forward_hidden instead (TeacherView), leaving the EMA eager for sampling."""
        self.block_run = None if compiler is None else compiler(fresh_block_run())

    @contextlib.contextmanager
    def blocks_eager(self):
        """The blocks eager for a while, compiled again after: the trainer's grids from a
        compiled student (no_grad, another batch: new graphs to compile, on one rank, for
        nothing)."""
        saved, self.block_run = self.block_run, None
        try:
            yield self
        finally:
            self.block_run = saved

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # ------------------------------------------------------------------ helpers
    def drop_labels(self, y, generator=None):
        """Classifier-free-guidance label dropout (p = class_dropout_prob), on y's device."""
        return self.y_embedder.drop_labels(y, generator)

    def check_block(self, k: int, what: str = "block") -> int:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.depth:
            raise ValueError(f"{what} {k!r} is outside 1..{self.depth} for this "
                             f"{self.depth}-block model")
        return k

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _trunk(self, x, t, y, hidden_block=None, stop=False, block_run=None):
        # pos_embed first: the sum then takes its contiguous (N, T, D) layout rather than the
        # patch embedding's transposed one, which every LayerNorm and fused kernel of the first
        # block would copy again (fp32 addition commutes: the same bits)
        x = self.pos_embed + self.x_embedder(x)
        c = self.t_embedder(t) + self.y_embedder(y)
        last = hidden_block if stop else self.depth
        run = block_run or self.block_run
        if not self._fusable(last, stop, compiled=run is not None):
            return self._trunk_blockwise(x, c, hidden_block, stop)
        run = run or DiTBlock.run
        # Block boundaries fused: block i's final gated residual and block i+1's (or the final
        # layer's) LayerNorm-modulate are one op. Block i+1's modulation is computed before
        # block i ends; the teacher's stop block ends with the plain residual.
        mods = self.blocks[0].modulation(c)
        x_in = ops.adaln_norm(x, mods[0], mods[1])
        hidden = None
        for i in range(1, last + 1):
            nxt = None
            if i < last:
                nxt = self.blocks[i].modulation(c)
                next_norm = nxt[:2]
            else:
                next_norm = None if stop else self.final_layer.modulation(c)
            x, x_in = run(self.blocks[i - 1], x, x_in, mods, next_norm)
            if i == hidden_block:
                hidden = x
            mods = nxt
        if stop:
            return None, hidden
        return self._output(self.final_layer.linear(x_in)), hidden

    def _trunk_blockwise(self, x, c, hidden_block, stop):
        """Block by block through each module's __call__, as the released code runs them:
        what runs when a block or the final layer carries hooks (or is wrapped)."""
        hidden = None
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)
            if i == hidden_block:
                hidden = x
                if stop:
                    return None, hidden
        return self.finish(x, c), hidden

    def _fusable(self, last: int, stop: bool, compiled: bool = False) -> bool:
        """Whether the fused-boundary trunk computes what the blockwise one would, hooks
        included: every module it bypasses (blocks 1..last, and the final layer unless the
        pass stops) is a plain DiTBlock/FinalLayer with no hook of its own and no global
        module hook is set. FSDP-sharded, checkpoint-wrapped or hooked blocks run blockwise.
        compiled: the blocks would run through one compiled function, which dynamo does not
        guard on hooks: then no submodule of theirs (attn, mlp, ...) may carry one either."""
        if _global_module_hooks():
            return False
        mods = list(self.blocks[:last])
        if not all(type(b) is DiTBlock for b in mods):
            return False
        if compiled and any(_has_hooks(s) for b in mods for s in b.modules()):
            return False
        if not stop:
            if type(self.final_layer) is not FinalLayer:
                return False
            mods.append(self.final_layer)
        return not any(_has_hooks(m) for m in mods)

    def finish(self, x, c):
        return self._output(self.final_layer(x, c))

    def _output(self, y):
        out = self.unpatchify(y)
        if self.learn_sigma and not self.return_sigma:
            out = out[:, : self.in_channels]
        return out

    # ------------------------------------------------------------------ entry points
    def forward(self, x, t, y, hidden_block: int | None = None):
        """Network output; with hidden_block=k also ap_head(hidden state after block k)."""
        if hidden_block is None:
            return self._trunk(x, t, y)[0]
        self.check_block(hidden_block)
        out, h = self._trunk(x, t, y, hidden_block)
        return out, self.ap_head(h)

    def forward_hidden(self, x, t, y, block: int, block_run: Callable | None = None):
        """Teacher: raw hidden state after `block`; later blocks are not run. block_run:
        what the blocks run through in this call (default: the model's; compile_blocks)."""
        self.check_block(block)
        return self._trunk(x, t, y, block, stop=True, block_run=block_run)[1]


def fresh_block_run() -> Callable:
    """DiTBlock.run with a code object of its own, for one torch.compile: dynamo keeps its
    compiled entries per code object, so every compile of the one DiTBlock.run would share
    one list and one recompile limit (8): the third compiled step in a process would find it
    full of the earlier steps' entries and run every block eagerly."""
    f = DiTBlock.run
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__,
                           f.__closure__)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    return g


class SiT(DiffusionTransformer):
    learn_sigma_default = False
    return_sigma = False


class DiT(DiffusionTransformer):
    learn_sigma_default = True
    return_sigma = True


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _make(cls, depth, hidden, heads, patch):
    def ctor(**kwargs):
        return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **kwargs)
    return ctor


SiT_models = {f"SiT-{s}/{p}": _make(SiT, *_SIZES[s], p) for s in _SIZES for p in (2, 4, 8)}
DiT_models = {f"DiT-{s}/{p}": _make(DiT, *_SIZES[s], p) for s in _SIZES for p in (2, 4, 8)}
ALL_MODELS = {**SiT_models, **DiT_models}


def build_model(name: str, **kwargs) -> DiffusionTransformer:
    if name not in ALL_MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ALL_MODELS)}")
    return ALL_MODELS[name](**kwargs)
