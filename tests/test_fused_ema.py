"""The fused EMA extension (csrc/, sra_fast.ext.FusedEMA) against fused_ema_ref, bit for bit.

CPU: the extension is built once per session (an installed sra_fast._C, else a JIT build of
csrc/ into ~/.cache/sra_fast/ext; ~20-30 s cold on 2 cores, ~1 s when cached) and must match
torch._foreach_lerp_ + copy_ exactly: fp32 EMA bit-identical (both lerp branches and the
0.5 boundary), bf16 shadow bit-identical, NaN-poisoned outputs all overwritten.
CUDA (marker `cuda`): the same on the GPU (aligned and unaligned tensors, multi-chunk sizes),
no host sync in step, and a CUDA-graph capture replayed with changed weight values.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from sra_fast import ext

SIZES = (1, 7, 1000, 4097, 2 * 16384 + 5)   # odd sizes; the last spans three 16K chunks
WEIGHTS = (1e-4, 0.3, 0.5, 0.7, 0.0, 1.0)   # small branch, boundary, large branch, skip, copy


def _toolchain_missing(cuda: bool = False) -> str | None:
    from torch.utils import cpp_extension
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH) to build csrc/"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension.load needs it)"
    if cuda and cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (CUDA_HOME) to build csrc/fused_ema.cu"
    return None


@pytest.fixture(scope="module")
def ext_mod():
    """The extension the package uses: installed sra_fast._C, else one JIT build per session."""
    reason = _toolchain_missing()
    if reason and ext.load() is None:
        pytest.skip(reason)
    t0 = time.perf_counter()
    mod = ext.load(jit=True)
    if mod is None:
        pytest.fail(f"the extension did not build: {ext.unavailable_reason()}")
    mod.load_seconds = time.perf_counter() - t0
    return mod


def make_case(device, sizes=SIZES, shadow_every=(True, False, True, True, True),
              offset=0, seed=0):
    """Fresh random EMA/model fp32 tensors, NaN-poisoned bf16 shadows (None for some).
    `offset` > 0 makes every tensor a view starting `offset` elements into a flat buffer
    (misaligned for 16-byte vector access)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(n):
        buf = torch.randn(n + offset, generator=g).to(device)
        return buf[offset:]

    ema = [rnd(n) for n in sizes]
    model = [rnd(n) * 2 + 0.5 for n in sizes]
    shadow = []
    for i, n in enumerate(sizes):
        if shadow_every[i % len(shadow_every)]:
            buf = torch.full((n + offset,), float("nan"), dtype=torch.bfloat16, device=device)
            shadow.append(buf[offset:])
        else:
            shadow.append(None)
    return ema, model, shadow


def clone_case(ema, model, shadow):
    return ([e.clone() for e in ema], [m.clone() for m in model],
            [None if s is None else s.clone() for s in shadow])


def assert_bitwise(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None:
            assert b is None
            continue
        assert not torch.isnan(a).any(), f"{what}[{i}] has NaN (unwritten element?)"
        ia = a.view(torch.int32 if a.dtype == torch.float32 else torch.int16)
        ib = b.view(torch.int32 if b.dtype == torch.float32 else torch.int16)
        if not torch.equal(ia, ib):
            bad = (ia != ib).nonzero().flatten()[:5].tolist()
            pytest.fail(f"{what}[{i}] (numel {a.numel()}) differs at {bad}: "
                        f"{a.flatten()[bad].tolist()} vs {b.flatten()[bad].tolist()}")


def check_against_ref(device, weights, offset=0, sizes=SIZES):
    ema, model, shadow = make_case(device, sizes=sizes, offset=offset)
    r_ema, r_model, r_shadow = clone_case(ema, model, shadow)
    fused = ext.FusedEMA(ema, model, shadow)
    assert fused.fused, fused.fallback_reason
    w = torch.zeros((), device=device)
    for wv in weights:
        w.fill_(wv)
        fused.step(w)
        ext.fused_ema_ref(r_ema, r_model, w, r_shadow)
        assert_bitwise(ema, r_ema, f"ema (w={wv})")
        assert_bitwise(shadow, r_shadow, f"shadow (w={wv})")


# --- CPU -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_extension_builds(ext_mod):
    """Build (or load) the extension; reports how long it took."""
    print(f"\nextension {ext_mod.__name__} ready in {ext_mod.load_seconds:.1f} s "
          f"(with_cuda={ext_mod.with_cuda})")
    assert ext.available() and ext.unavailable_reason() is None
    assert ext_mod.chunk_elements % 4 == 0


@pytest.mark.parametrize("source", ["fused_ema.cu", "fused_adamw_ema.cu"])
def test_cuda_source_compiles_for_sm90(tmp_path, source):
    """csrc/*.cu compile for the H100 (sm_90) with nvcc on a machine without a GPU,
    so a compile error shows here instead of on a lent GPU. The CPU torch wheel lacks the one
    header CUDA builds of torch generate (c10/cuda/impl/cuda_cmake_macros.h, a single define);
    the test supplies it. Object code only: nothing is linked or run."""
    import subprocess
    import sysconfig
    from pathlib import Path

    from torch.utils import cpp_extension
    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and
                                    str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"))
    if not nvcc or not Path(nvcc).exists():
        pytest.skip("no nvcc on this machine")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    incs = [f"-I{p}" for p in cpp_extension.include_paths()]
    obj = tmp_path / (source + ".o")
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-O3", "-c", str(csrc / source),
           "-o", str(obj), *incs, f"-I{tmp_path / 'stub'}", f"-I{csrc}",
           f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=_C", "-DWITH_CUDA",
           "--expt-relaxed-constexpr", "-w"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert obj.stat().st_size > 0


@pytest.mark.parametrize("weight", WEIGHTS)
def test_cpu_matches_reference_bitwise(ext_mod, weight):
    check_against_ref("cpu", [weight])


def test_cpu_repeated_steps_and_views(ext_mod):
    check_against_ref("cpu", [1e-4, 0.7, 0.3, 1e-3], offset=1)


def test_cpu_plan_details(ext_mod):
    ema, model, shadow = make_case("cpu")
    fused = ext.FusedEMA(ema, model, shadow)
    plan = fused._plan
    assert plan.num_tensors == len(SIZES) and plan.numel == sum(SIZES)
    assert plan.num_shadows == sum(s is not None for s in shadow)
    assert plan.num_chunks == sum(-(-n // ext_mod.chunk_elements) for n in SIZES)
    # in-place writes bump version counters, like torch's in-place ops
    v_ema, v_sh = ema[0]._version, shadow[0]._version
    fused.step(torch.tensor(0.1))
    assert ema[0]._version > v_ema and shadow[0]._version > v_sh
    # a float weight works (allocates; not for graphs)
    fused.step(0.25)
    # empty lists are a no-op
    ext.FusedEMA([], []).step(torch.tensor(0.5))


def test_cpu_errors(ext_mod):
    e, m = [torch.zeros(4)], [torch.ones(4)]
    with pytest.raises(ValueError):
        ext.FusedEMA(e, m + m)
    with pytest.raises(ValueError):
        ext.FusedEMA(e, [torch.ones(5)])
    with pytest.raises(ValueError):
        ext.FusedEMA(e, m, [torch.zeros(4, dtype=torch.bfloat16)] * 2)
    fused = ext.FusedEMA(e, m)
    with pytest.raises((RuntimeError, TypeError)):
        fused.step(torch.tensor(0.5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="one-element"):
        fused.step(torch.tensor([0.5, 0.5]))
    e[0].data = torch.zeros(4)                      # storage swapped after the plan was built
    with pytest.raises(RuntimeError, match="no longer has the storage"):
        fused.step(torch.tensor(0.5))


def test_fallback_for_unsupported_inputs(ext_mod):
    """float64 tensors are valid but not fused: the reference runs (and says so once)."""
    e = [torch.randn(10, dtype=torch.float64)]
    m = [torch.randn(10, dtype=torch.float64)]
    want = [e[0].clone()]
    with pytest.warns(RuntimeWarning, match="reference"):
        fused = ext.FusedEMA(e, m)
    assert not fused.fused and "float32" in fused.fallback_reason
    fused.step(torch.tensor(0.3, dtype=torch.float64))
    torch._foreach_lerp_(want, m, 0.3)
    assert torch.equal(e[0], want[0])


def test_reference_float_and_tensor_weight_agree():
    e1, m, s1 = make_case("cpu", seed=3)
    e2, _, s2 = clone_case(e1, m, s1)
    ext.fused_ema_ref(e1, m, 0.3, s1)
    ext.fused_ema_ref(e2, m, torch.tensor(0.3), s2)
    assert_bitwise(e1, e2, "ema")
    assert_bitwise(s1, s2, "shadow")


# --- CUDA ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_ext(ext_mod):
    reason = _toolchain_missing(cuda=True)
    if not ext_mod.with_cuda:
        pytest.fail(f"{ext_mod.__name__} was built without CUDA"
                    + (f" ({reason})" if reason else ""))
    return ext_mod


@pytest.mark.parametrize("offset", [0, 1, 2])   # 16 B aligned (vector path), 4 B, 8 B
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_reference_bitwise(weight, offset):
    check_against_ref("cuda", [weight], offset=offset)


@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_large_many_tensors():
    sizes = (1 << 20, 3, 1152 * 1152 + 1, 65536, 1152, 17, 4 * 16384)
    check_against_ref("cuda", [1e-4, 0.9, 1e-4], sizes=sizes)


@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_has_no_host_sync():
    ema, model, shadow = make_case("cuda")
    fused = ext.FusedEMA(ema, model, shadow)
    w = torch.full((), 1e-3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused.step(w)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_replay_with_new_weight():
    ema, model, shadow = make_case("cuda", sizes=SIZES + (300000,))
    fused = ext.FusedEMA(ema, model, shadow)          # plan (and device table) before capture
    w = torch.full((), 0.3, device="cuda")
    start = [e.clone() for e in ema]

    s = torch.cuda.Stream()                           # warm up off the default stream
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused.step(w)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fused.step(w)

    torch._foreach_copy_(ema, start)                  # back to the start; capture ran nothing
    r_ema, r_model, r_shadow = clone_case(ema, model, shadow)
    for wv, bump in ((0.7, 0.0), (1e-4, 1.0), (0.5, -2.0)):
        w.fill_(wv)                                   # a new weight value, same graph
        torch._foreach_add_(model, bump)              # the model moves between steps
        torch._foreach_add_(r_model, bump)
        g.replay()
        ext.fused_ema_ref(r_ema, r_model, torch.tensor(wv, device="cuda"), r_shadow)
        torch.cuda.synchronize()
        assert_bitwise(ema, r_ema, f"ema after replay (w={wv})")
        assert_bitwise(shadow, r_shadow, f"shadow after replay (w={wv})")


@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_plan_refused_during_capture():
    ema, model, _ = make_case("cuda", sizes=(7,))
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before CUDA graph capture"):
        with torch.cuda.graph(g):
            ext.FusedEMA(ema, model)


@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bandwidth_report():
    """Not a pass/fail check: prints fused vs reference time and GB/s (-s to see it) for
    ~256M parameters in SiT-XL-like tensors (14 bytes/param fused: read ema+p, write ema+bf16)."""
    sizes = [1152 * 1152] * 200 + [1152] * 400
    ema = [torch.randn(n, device="cuda") for n in sizes]
    model = [torch.randn(n, device="cuda") for n in sizes]
    shadow = [torch.empty(n, device="cuda", dtype=torch.bfloat16) for n in sizes]
    w = torch.full((), 1e-4, device="cuda")
    fused = ext.FusedEMA(ema, model, shadow)

    def timed(fn, iters=20):
        for _ in range(3):
            fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / iters

    n = sum(sizes)
    t_fused = timed(lambda: fused.step(w))
    t_ref = timed(lambda: ext.fused_ema_ref(ema, model, w, shadow))
    print(f"\n{torch.cuda.get_device_name()}: {len(sizes)} tensors, {n / 1e6:.0f}M params: "
          f"fused {t_fused:.3f} ms ({14 * n / t_fused / 1e6:.0f} GB/s), fused_ema_ref "
          f"{t_ref:.3f} ms ({t_ref / t_fused:.2f}x)")
    assert t_fused > 0
