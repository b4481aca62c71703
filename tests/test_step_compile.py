"""The training step with torch.compile (TrainStep(compile=...), train.py --compile): the
compiled student and teacher give the uncompiled step's updates, in eager and captured
(cuda_graph="emulate") mode, with gradient accumulation and every teacher variant, with the
reference ops and with the Triton kernels (custom ops, opaque to inductor); no graph breaks;
the combinations that cannot work are refused. Most checks use dynamo's aot_eager backend
(the same ATen ops as eager: bitwise comparable, seconds to compile); one runs inductor on the
CPU; the CUDA tests (marked) run inductor inside a real CUDA-graph capture and check that
the compiled eager step makes no host sync."""
import pytest
import torch
from torch._dynamo.utils import counters

from sra_fast import ops
from sra_fast.models.dit import DiT, SiT
from sra_fast.ops import attention as A

from test_step import batches, build, same, snapshot
from trainer_fixtures import aot_eager_compile_fn, restore_backends  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# compiled graphs of a step: the whole student and the teacher's forward ("model"), or two
# forms of a block for each ("blocks": all blocks but the last, and the last, whose next
# LayerNorm-modulate is the final layer's, or none where the teacher stops); never one per
# block
GRAPHS = {"model": 2, "blocks": 4}


def run_steps(n=3, **kw):
    m, ema, opt, step = build(**kw)
    for x, y in batches(n):
        step(x, y, 0.5)
    return snapshot(m, ema, opt), step.read_stats(), step


@pytest.mark.parametrize("scope", ["blocks", "model"])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(mode="emulate"),
    dict(mode="emulate", grad_accum=2),
    dict(cls=DiT, grad_accum=2),
    dict(teacher_full=True),
    dict(precision="fp32", teacher_fp32=True),
    dict(mode="emulate", teacher_bf16=True),
], ids=["eager", "graph", "graph-accum", "dit-accum", "full-teacher", "fp32-teacher",
        "bf16-teacher"])
def test_compiled_step_is_bitwise_the_uncompiled_step(kw, scope):
    with ops.use_backend("ref"):
        want, want_stats, _ = run_steps(**kw)
        counters.clear()
        got, got_stats, step = run_steps(**kw, compile="default", compile_backend="aot_eager",
                                         compile_scope=scope)
    # the student and the teacher ran compiled, each graph in one piece
    assert counters["stats"]["unique_graphs"] == GRAPHS[scope], dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert step.graph_mode == (kw.get("mode") == "emulate")
    assert got_stats == want_stats
    assert same(got, want)


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_step_with_the_triton_kernels_is_bitwise_and_unbroken(scope):
    """The fused ops are custom ops inside the compiled graphs (no graph break: inductor
    fuses around them) and compute what their eager autograd.Functions do."""
    with ops.use_backend("triton"):
        want, want_stats, _ = run_steps(2, mode="emulate", grad_accum=2)
        counters.clear()
        got, got_stats, _ = run_steps(2, mode="emulate", grad_accum=2, compile="default",
                                      compile_backend="aot_eager", compile_scope=scope)
    assert counters["stats"]["unique_graphs"] == GRAPHS[scope], dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert got_stats == want_stats
    assert same(got, want)


def test_gpu_route_of_auto_attention_leaves_whole_graphs(monkeypatch):
    """On a GPU, `auto` attention's first call imports the flash_attn candidates and reads
    the card's capability into a cache: traced, that is a graph break that stays for the whole
    run (the guards do not cover the caches). The step does that setup before compiling. The
    GPU route taken on the CPU (capability 9.0, empty caches, as in a fresh process)."""
    monkeypatch.setattr(A, "_is_gpu", lambda t: True)
    monkeypatch.setattr(A, "_capability", lambda idx: (9, 0))
    monkeypatch.setattr(A, "_FA", {"loaded": False, "impls": [], "errors": {}})
    monkeypatch.setattr(A, "_SM", {})
    monkeypatch.setitem(A._state, "quiet", True)
    with ops.use_backend("ref"), A.use_attention_backend("auto"):
        _, stats, _ = run_steps(3, compile="default", compile_backend="aot_eager")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == GRAPHS["blocks"], dict(counters["stats"])
    assert A._SM == {0: (9, 0)} and stats["steps"] == 3


def test_the_attention_choice_is_announced_before_compiled_steps(monkeypatch, capsys):
    """Compiled calls print nothing, so the step announces the choice when it is made, with
    the dtype and head size the model runs with."""
    monkeypatch.setattr(A, "_announced", set())
    monkeypatch.setitem(A._state, "quiet", False)
    with ops.use_backend("ref"), A.use_attention_backend("auto"):
        build(compile="default", compile_backend="aot_eager")
    assert capsys.readouterr().out.splitlines() == [
        "sra_fast attention: auto -> sdpa (cpu, torch.bfloat16, head_dim 16)"]


def test_compiled_blocks_run_every_block_but_hooked_ones_and_are_not_copied_to_the_ema():
    """compile_blocks: every block of the fused trunk runs through the one compiled `run`,
    bitwise the eager model (aot_eager). A hooked block sends the model down the blockwise
    trunk, which stays eager: dynamo does not guard on hooks, so a block compiled without
    one would stand for the hooked one (measured: it dropped the hook). The EMA copy and
    compile_blocks(None) run eagerly."""
    from sra_fast.objective import make_ema
    torch.manual_seed(0)
    m = SiT(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10)
    with torch.no_grad():   # as trained: gates and output layer not zero (a hook can count)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g)
    y = torch.tensor([1, 7])
    with ops.use_backend("ref"):
        want = m(x, t, y, hidden_block=2)
        calls = []

        def compiler(fn):
            c = torch.compile(fn, backend="aot_eager", dynamic=False)
            return lambda *a: (calls.append(fn.__name__), c(*a))[1]

        m.compile_blocks(compiler)
        got = m(x, t, y, hidden_block=2)
        assert calls == ["run"] * 4 and all(torch.equal(a, b) for a, b in zip(got, want))
        assert make_ema(m).block_run is None
        h = m.blocks[1].register_forward_hook(lambda mod, inp, out: out * 0.5)
        calls.clear()
        got = m(x, t, y, hidden_block=4)[1]
        m.compile_blocks(None)
        want = m(x, t, y, hidden_block=4)[1]
        h.remove()
        assert calls == [] and torch.equal(got, want)
        assert not torch.equal(want, m(x, t, y, hidden_block=4)[1])   # the hook did count
        # a hook inside a block (its attention) likewise: the compiled trunk would drop it
        h = m.blocks[2].attn.register_forward_hook(lambda mod, inp, out: out * 0.5)
        m.compile_blocks(compiler)
        calls.clear()
        got = m(x, t, y, hidden_block=4)[1]
        m.compile_blocks(None)
        want = m(x, t, y, hidden_block=4)[1]
        assert calls == [] and torch.equal(got, want)
        h.remove()
        assert not torch.equal(want, m(x, t, y, hidden_block=4)[1])
        # blocks_eager(): eager for a while (the trainer's grids), compiled after
        m.compile_blocks(compiler)
        calls.clear()
        with m.blocks_eager():
            m(x, t, y)
        assert calls == [] and m.block_run is not None
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_a_step_compiling_hooked_blocks_says_they_run_eagerly():
    from sra_fast.step import TrainStep
    m, ema, opt, step = build()
    m.blocks[2].mlp.register_forward_pre_hook(lambda mod, args: None)
    with pytest.warns(UserWarning, match=r"blocks \(or modules in them\) carry hooks"):
        TrainStep(m, ema, step.objective, opt, compile="default", compile_backend="aot_eager")
    assert m.block_run is not None   # (used again once the hooks are gone)


def test_a_refused_step_leaves_the_model_uncompiled():
    from sra_fast.step import TrainStep
    m, ema, opt, step = build()
    with pytest.raises(ValueError, match="ema_impl must be"):
        TrainStep(m, ema, step.objective, opt, compile="default", compile_backend="aot_eager",
                  ema_impl="lerp")
    assert m.block_run is None


def test_each_compiled_step_has_its_own_recompile_limit():
    """Every compile of the block function gets a code object of its own: dynamo's entries
    (and its limit of 8 per code object) are not shared, so the third compiled step in one
    process (a sweep, a notebook) still compiles its 4 graphs instead of running eagerly."""
    with ops.use_backend("ref"):
        for i in range(3):
            counters.clear()
            run_steps(1, compile="default", compile_backend="aot_eager")
            assert counters["stats"]["unique_graphs"] == GRAPHS["blocks"], (i, counters["stats"])


@pytest.mark.timeout(300)
def test_blocks_under_ddp_are_not_split_at_its_buckets(tmp_path):
    """DDP's forward makes dynamo hand every graph compiled inside it to its DDPOptimizer,
    which splits a graph at DDP's buckets (1 MiB first) so the all-reduce overlaps it. The
    blocks are already the pieces: the step turns that off for them (blocks of ~3 MB here,
    one DDP process over gloo)."""
    import torch.distributed as dist
    from sra_fast.objective import SRAConfig, SRAObjective, make_ema
    from sra_fast.step import TrainStep, make_optimizer
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        m = SiT(input_size=8, patch_size=2, hidden_size=256, depth=3, num_heads=4,
                num_classes=10)
        assert sum(p.numel() for p in m.blocks[0].parameters()) * 4 > 2 ** 21
        ema = make_ema(m)
        obj = SRAObjective.for_model(m, SRAConfig(block_out_s=1, block_out_t=2))
        opt = make_optimizer(m, lr=1e-3)
        with ops.use_backend("ref"):
            step = TrainStep(m, ema, obj, opt, student=torch.nn.parallel
                             .DistributedDataParallel(m), compile="default",
                             compile_backend="aot_eager",
                             generator=torch.Generator().manual_seed(1))
            for x, y in batches(2):
                step(x, y, 0.5)
        assert counters["stats"]["unique_graphs"] == GRAPHS["blocks"], dict(counters["stats"])
        # one AOT compile per graph: none split into pieces (split: 6 here)
        aot = counters["aot_autograd"]
        assert aot["total"] == GRAPHS["blocks"], dict(aot)
        assert step.read_stats()["steps"] == 2
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", [False, "emulate"])
def test_compiled_blocks_let_the_gradient_all_reduce_start_before_the_backward_ends(
        mode, tmp_path, monkeypatch):
    """The step's own gradient sync (what --cuda-graph uses across processes) starts a
    bucket's all-reduce from gradient hooks as soon as its gradients are in. Compiled by
    blocks, each block's backward is an autograd node of its own: buckets of the last blocks
    start before the backward has reached the first block (compiled whole, every gradient
    came at the end of one compiled backward: nothing could start earlier)."""
    import torch.distributed as dist
    from sra_fast.grad_sync import FlatGradSync
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        events = []
        orig = FlatGradSync._launch_ready

        def launch_ready(self):
            n = self._next
            orig(self)
            events.extend(["all-reduce"] * (self._next - n))

        monkeypatch.setattr(FlatGradSync, "_launch_ready", launch_ready)
        with ops.use_backend("ref"):
            m, ema, opt, step = build(mode=mode, compile="default", compile_backend="aot_eager",
                                      grad_sync=dist.group.WORLD, grad_bucket_mb=0.02)
            for p in m.blocks[0].parameters():
                p.register_post_accumulate_grad_hook(lambda p: events.append("block 1"))
            data = batches(2)
            step(*data[0], 0.5)   # (the first step learns the order gradients come in)
            events.clear()
            step(*data[1], 0.5)
        assert counters["stats"]["unique_graphs"] == GRAPHS["blocks"], dict(counters["stats"])
        # (measured: 15 of 22 buckets before the first block's gradients; compiled whole: 1,
        # in the order the gradient hooks happened to run after the one backward)
        n = len(step._grad_sync.buckets)
        assert events[:events.index("block 1")].count("all-reduce") >= n // 2 >= 5, events
        assert step._grad_sync.launched_in_backward == n
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compile", [None, "default"])
def test_graph_warmup_goes_on_while_a_warmup_still_compiles(compile, monkeypatch):
    """A compile inside the capture would fail it (compiling syncs): with compile, warm-up
    runs go on until one compiles nothing new (here 2 where graph_warmup=1 asks for 1)."""
    from sra_fast.step import TrainStep
    bodies = []
    orig = TrainStep._graph_body
    monkeypatch.setattr(TrainStep, "_graph_body", lambda self: (bodies.append(1),
                                                                orig(self))[1])
    with ops.use_backend("ref"):
        m, ema, opt, step = build(mode="emulate", graph_warmup=1, compile=compile,
                                  compile_backend="aot_eager")
        step(*batches(1)[0], 0.5)
    assert len(bodies) == (2 if compile else 1) + 1   # warm-ups, then the emulated replay


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_inductor_compiled_step_matches_the_uncompiled_step_on_cpu(scope):
    """Inductor's own kernels (C++ on the CPU): the same step to fp32 rounding. SGD, whose
    update is linear in the gradient, so rounding differences stay rounding-sized (Adam's
    first update, ~lr * sign(g), would magnify them where g ~ 0)."""
    with ops.use_backend("ref"):
        want, want_stats, _ = run_steps(2, precision="fp32", opt="sgd", lr=1e-2)
        got, got_stats, _ = run_steps(2, precision="fp32", opt="sgd", lr=1e-2,
                                      compile="default", compile_scope=scope)
    assert counters["stats"]["unique_graphs"] == GRAPHS[scope], dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for k in ("loss", "denoise_loss", "align_loss", "grad_norm"):
        assert got_stats[k] == pytest.approx(want_stats[k], rel=1e-5), k
    assert got_stats["steps"] == 2 and got_stats["nonfinite"] == 0
    init = [p.detach().clone() for p in build(precision="fp32", opt="sgd")[0].parameters()]
    assert max((w - i).abs().max().item() for w, i in zip(want, init)) > 1e-4   # it moved
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compile_modes_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="compile must be None or one of"):
        build(compile="max-autotune-please")
    with pytest.raises(ValueError, match="cannot run inside the captured step"):
        build(mode="emulate", compile="reduce-overhead")
    with pytest.raises(ValueError, match="with gradient accumulation"):
        build(grad_accum=2, compile="reduce-overhead")
    with pytest.raises(ValueError, match="compile_scope must be one of"):
        build(compile="default", compile_scope="layers")


def test_reduce_overhead_marks_each_step_begin(monkeypatch):
    """Inductor's CUDA graphs reuse their output buffers from one replay to the next: the
    eager step tells it where a step begins, so it never overwrites outputs still in use."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin",
                        lambda: marks.append(1))
    with ops.use_backend("ref"):
        run_steps(2, compile="reduce-overhead", compile_backend="aot_eager")
    assert len(marks) == 2


def test_trainer_compile_setting_reaches_the_step(tmp_path, monkeypatch, restore_backends):  # noqa: F811
    """--compile: the trainer compiles the student and the teacher in that mode (aot_eager
    here, for speed) and trains; a refused combination is one RunError line."""
    import sra_fast.step as S
    from sra_fast.config import TrainConfig
    from sra_fast.data import DigitsDataset
    from sra_fast.trainer import RunError, Trainer

    def cfg(name, **kw):
        return TrainConfig(**{**dict(out_dir=str(tmp_path), exp_name=name, batch_size=8,
                                     max_steps=2, log_every=1, ckpt_every=2, sample_every=0,
                                     kernels="ref", attn="math", device="cpu", threads=1),
                              **kw})

    with pytest.raises(RunError, match="with gradient accumulation use compile mode default"):
        Trainer(cfg("refused", compile="reduce-overhead", grad_accum=2),
                dataset=DigitsDataset(), quiet=True)
    seen = []
    monkeypatch.setattr(S, "compile_fn", aot_eager_compile_fn(seen))
    tr = Trainer(cfg("ok", compile="default", sample_every=2, sample_weights="student",
                     sample_num_steps=2), dataset=DigitsDataset(), quiet=True)
    tr.train()
    assert seen == ["default"] * 2   # the student's and the teacher's block function
    # (the grid from the student ran its blocks eagerly: no graph of its own)
    assert counters["stats"]["unique_graphs"] == GRAPHS["blocks"], dict(counters["stats"])
    assert (tmp_path / "ok" / "samples" / "step-0000002.png").exists()
    assert tr.step == 2 and (tmp_path / "ok" / "checkpoints" / "0000002.pt").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_compiled_step_inside_a_captured_cuda_graph_matches_eager():
    """Inductor's Triton kernels captured in the step's one CUDA graph, with our fused ops
    (kernels auto) inside the compiled graphs: the uncompiled eager step's updates to bf16
    tolerance (the same bounds as the graph-vs-eager CUDA tests)."""
    from test_step_cuda import batches as cuda_batches
    from test_step_cuda import build as cuda_build
    from test_step_cuda import params, rel_update_diff, run
    data = cuda_batches(3)
    out = []
    with ops.use_backend("auto"), A.use_attention_backend("auto"):
        for mode, comp in ((False, None), ("strict", "default")):
            torch._dynamo.reset()
            counters.clear()
            if comp:   # attention's caches as in a fresh process: the step must fill them
                A._FA.update(loaded=False, impls=[], errors={})
                A._SM.clear()
            m, ema, opt, step = cuda_build(SiT, grad_accum=2, mode=mode, compile=comp)
            p0 = params(m, ema)
            run(step, data)
            out.append((params(m, ema), step.read_stats(), step))
    (pe, se, _), (pg, sg, g) = out
    assert g.graph_mode and g.captures == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == GRAPHS["blocks"], dict(counters["stats"])
    assert se["steps"] == sg["steps"] == 3 and se["nonfinite"] == sg["nonfinite"] == 0
    for k in ("loss", "denoise_loss", "align_loss", "grad_norm"):
        assert sg[k] == pytest.approx(se[k], rel=2e-2), k
    assert rel_update_diff(p0, pe, pg) < 5e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_compiled_eager_step_has_no_host_sync():
    """The compiled student and teacher add no host sync to the eager step (guards and
    inductor's wrappers are host-side only), so a compiled step still never waits for the
    GPU (the captured one replays without any host work at all)."""
    from test_step_cuda import batches as cuda_batches
    from test_step_cuda import build as cuda_build
    with ops.use_backend("auto"), A.use_attention_backend("auto"):
        m, ema, opt, step = cuda_build(compile="default")
        data = cuda_batches(3)
        step(*data[0], 0.5)                 # compiles (and autotunes: syncs) here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(*data[1], 0.5)
            step(*data[2], 0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert step.read_stats()["steps"] == 3
