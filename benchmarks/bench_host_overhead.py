"""Host-side (Python + dispatcher) cost per call of the fused element-wise ops, on CPU.

Every Triton launch in the kernel modules is replaced by a stub that only counts, so what is
timed is everything *around* the kernels: the sra_fast.ops dispatcher, torch.library
custom-op dispatch or autograd.Function glue, argument checks, output allocations, the
partial-sum reductions and dtype casts, and the autograd engine. Tiny tensors keep the
remaining real torch ops (allocations, sums, casts) at their fixed cost.

These are CPU host timings on whatever machine runs this. They are not GPU figures: on a GPU
each Triton launch adds its own Python launch cost (~10-30 us each in triton 3.6; not
measured here since the stubs replace it: see the `launches` column) and each torch op adds
a CUDA launch; the GPU kernels themselves are timed by `bench_ops.py --timing graph`.

  python benchmarks/bench_host_overhead.py             # all ops, all paths
  python benchmarks/bench_host_overhead.py --iters 5000 --op adaln_norm

Paths:
  ref        the plain-PyTorch reference op (sra_fast.ops.reference), fwd+bwd
  custom-op  the torch.library custom op (torch.ops.sra_fast.<op>) with its registered
             autograd (what torch.compile traces)
  fn         the kernels' torch.autograd.Function (<Op>Fn.apply)
  public     sra_fast.kernels.<op> (the public kernel function; eager picks fn or custom-op)
  dispatch   sra_fast.ops.<op> with backend "triton" (the dispatcher + public function)
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# CPU tensors reach the kernels through the dispatcher only under TRITON_INTERPRET=1, which
# must be set before triton is imported. The kernels never run here (stubbed), so the
# interpreter's own speed does not enter the figures. Set, not defaulted: an inherited
# TRITON_INTERPRET=0 would send the dispatch path to the reference.
os.environ["TRITON_INTERPRET"] = "1"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

OPS = ("adaln_norm", "gated_residual", "gated_residual_adaln_norm", "align_loss")
PATHS = ("ref", "custom-op", "fn", "public", "dispatch")
SHAPE = (2, 16, 64)

LAUNCHES = {"n": 0}


class _StubLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) counts and does nothing."""

    def __init__(self, name):
        self.name = name

    def _launch(self, *args, **kwargs):
        LAUNCHES["n"] += 1

    def __getitem__(self, grid):
        return self._launch

    def run(self, *args, **kwargs):  # kernel.run(..., grid=...) style calls
        LAUNCHES["n"] += 1


def stub_triton_launches():
    """Replace every *_kernel attribute of the kernel modules by a counting stub."""
    import importlib
    names = []
    for modname in ("adaln_norm", "gated_residual", "align_loss", "linear_act"):
        mod = importlib.import_module(f"sra_fast.kernels.{modname}")
        for attr in list(vars(mod)):
            obj = getattr(mod, attr)
            if attr.endswith("_kernel") and type(obj).__name__ in (
                    "JITFunction", "InterpretedFunction", "Autotuner", "Heuristics"):
                setattr(mod, attr, _StubLaunch(attr))
                names.append(f"{modname}.{attr}")
    return names


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def make_case(op, dtype):
    import sra_fast.kernels as K
    from sra_fast import ops
    from sra_fast.ops import reference as R
    N, T, D = SHAPE
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype)
    eps = R.LN_EPS
    if op == "adaln_norm":
        ins, mask = [r(N, T, D), r(N, D), r(N, D)], [True] * 3
        paths = {"ref": lambda x, a, b: R.adaln_norm_ref(x, a, b, eps),
                 "custom-op": lambda x, a, b: torch.ops.sra_fast.adaln_norm(x, a, b, eps, x.dtype),
                 "fn": lambda x, a, b: K.AdaLNNormFn.apply(x, a, b, eps),
                 "public": lambda x, a, b: K.adaln_norm(x, a, b, eps),
                 "dispatch": lambda x, a, b: ops.adaln_norm(x, a, b, eps)}
    elif op == "gated_residual":
        ins, mask = [r(N, T, D), r(N, D), r(N, T, D)], [True] * 3
        paths = {"ref": R.gated_residual_ref,
                 "custom-op": torch.ops.sra_fast.gated_residual,
                 "fn": K.GatedResidualFn.apply,
                 "public": K.gated_residual,
                 "dispatch": ops.gated_residual}
    elif op == "gated_residual_adaln_norm":
        ins, mask = [r(N, T, D), r(N, D), r(N, T, D), r(N, D), r(N, D)], [True] * 5
        paths = {"ref": lambda *a: R.gated_residual_adaln_norm_ref(*a, eps),
                 "custom-op": lambda *a: torch.ops.sra_fast.gated_residual_adaln_norm(
                     *a, eps, a[0].dtype),
                 "fn": lambda *a: K.GatedResidualAdaLNNormFn.apply(*a, eps),
                 "public": lambda *a: K.gated_residual_adaln_norm(*a, eps),
                 "dispatch": lambda *a: ops.gated_residual_adaln_norm(*a, eps)}
    elif op == "align_loss":
        ins, mask = [r(N, T, D), r(N, T, D)], [True, False]
        paths = {"ref": lambda s, t: R.align_loss_ref(s, t, "cos"),
                 "custom-op": lambda s, t: torch.ops.sra_fast.align_loss(s, t, "cos")[0],
                 "fn": lambda s, t: K.AlignLossFn.apply(s, t, "cos"),
                 "public": lambda s, t: K.align_loss(s, t, "cos"),
                 "dispatch": lambda s, t: ops.align_loss(s, t, "cos")}
    else:
        raise ValueError(op)
    return ins, mask, paths


def make_step(fn, ins, mask):
    leaves = [t.detach().clone().requires_grad_(m) for t, m in zip(ins, mask)]
    wrt = [t for t in leaves if t.requires_grad]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]

    def step():
        o = fn(*leaves)
        return torch.autograd.grad(o if isinstance(o, tuple) else (o,), wrt, grads)
    return step


def time_us(step, iters, repeats):
    for _ in range(max(10, iters // 10)):
        step()
    meds = []
    for _ in range(repeats):
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        meds.append(statistics.median(ts) * 1e6)
    return min(meds)  # the least-disturbed repeat's median


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", default="all")
    p.add_argument("--paths", default="all")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = p.parse_args()
    ops_ = OPS if args.op == "all" else tuple(args.op.split(","))
    paths_ = PATHS if args.paths == "all" else tuple(args.paths.split(","))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.set_num_threads(1)

    from sra_fast import ops
    stubbed = stub_triton_launches()
    ops.set_backend("triton")
    print(f"# torch {torch.__version__} | {len(stubbed)} Triton kernels stubbed | shape "
          f"{SHAPE} {args.dtype} | fwd+bwd per call, median of {args.iters}, best of "
          f"{args.repeats} repeats | CPU host time, not a GPU figure")
    rows = []
    for op in ops_:
        ins, mask, paths = make_case(op, dtype)
        for path in paths_:
            step = make_step(paths[path], ins, mask)
            LAUNCHES["n"] = 0
            with _CountOps() as cm:
                step()
            launches = LAUNCHES["n"]
            n_aten = len(cm.ops) if path in ("ref", "fn") else None  # custom ops hide theirs
            us = time_us(step, args.iters, args.repeats)
            rows.append((op, path, us, launches, n_aten, cm.ops))
    print(f"{'op':<27} {'path':<10} {'us/call':>8} {'launches':>8} {'aten_ops':>8}")
    for op, path, us, launches, n_aten, names in rows:
        print(f"{op:<27} {path:<10} {us:8.1f} {launches:8d} "
              f"{'' if n_aten is None else n_aten:>8}")
    if os.environ.get("BENCH_HOST_VERBOSE"):
        for op, path, _, _, n_aten, names in rows:
            if n_aten is not None:
                print(f"# {op} {path}: {' '.join(names)}")


if __name__ == "__main__":
    main()
