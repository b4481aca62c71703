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


def run_steps(n=3, **kw):
    m, ema, opt, step = build(**kw)
    for x, y in batches(n):
        step(x, y, 0.5)
    return snapshot(m, ema, opt), step.read_stats(), step


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
def test_compiled_step_is_bitwise_the_uncompiled_step(kw):
    with ops.use_backend("ref"):
        want, want_stats, _ = run_steps(**kw)
        counters.clear()
        got, got_stats, step = run_steps(**kw, compile="default", compile_backend="aot_eager")
    # the student and the teacher ran compiled (two graphs), in one piece each
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert step.graph_mode == (kw.get("mode") == "emulate")
    assert got_stats == want_stats
    assert same(got, want)


def test_compiled_step_with_the_triton_kernels_is_bitwise_and_unbroken():
    """The fused ops are custom ops inside the compiled graphs (no graph break: inductor
    fuses around them) and compute what their eager autograd.Functions do."""
    with ops.use_backend("triton"):
        want, want_stats, _ = run_steps(2, mode="emulate", grad_accum=2)
        counters.clear()
        got, got_stats, _ = run_steps(2, mode="emulate", grad_accum=2, compile="default",
                                      compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert got_stats == want_stats
    assert same(got, want)


def test_gpu_route_of_auto_attention_leaves_two_whole_graphs(monkeypatch):
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
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
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
def test_inductor_compiled_step_matches_the_uncompiled_step_on_cpu():
    """Inductor's own kernels (C++ on the CPU): the same step to fp32 rounding. SGD, whose
    update is linear in the gradient, so rounding differences stay rounding-sized (Adam's
    first update, ~lr * sign(g), would magnify them where g ~ 0)."""
    with ops.use_backend("ref"):
        want, want_stats, _ = run_steps(2, precision="fp32", opt="sgd", lr=1e-2)
        got, got_stats, _ = run_steps(2, precision="fp32", opt="sgd", lr=1e-2,
                                      compile="default")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
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
        return TrainConfig(out_dir=str(tmp_path), exp_name=name, batch_size=8, max_steps=2,
                           log_every=1, ckpt_every=2, sample_every=0, kernels="ref",
                           attn="math", device="cpu", threads=1, **kw)

    with pytest.raises(RunError, match="with gradient accumulation use compile mode default"):
        Trainer(cfg("refused", compile="reduce-overhead", grad_accum=2),
                dataset=DigitsDataset(), quiet=True)
    seen = []
    monkeypatch.setattr(S, "compile_fn", aot_eager_compile_fn(seen))
    tr = Trainer(cfg("ok", compile="default"), dataset=DigitsDataset(), quiet=True)
    tr.train()
    assert seen == ["default", "default"]   # the student and the teacher
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
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
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
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
