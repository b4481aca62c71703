"""Static resources of every Triton kernel, compiled for an H100 (sm_90) without a GPU.

Each op's host functions (forward and backward) run on CPU tensors of the real shapes while
Triton's active driver is replaced by a compile-only one that reports a CUDA sm_<arch>
target: every `kernel[grid](...)` then compiles exactly the specialization a GPU launch at
those shapes would (same constexprs, num_warps, argument types and alignment) and returns
without launching. The cubins are read with Triton's bundled `cuobjdump`. This checks what
the CPU interpreter cannot: that the kernels get through Triton's real GPU pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas), with their register count, spills (local memory)
and shared memory, and the occupancy those allow. It is no timing: bench_ops.py times them.

Triton's version here may differ from the GPU machine's (the table says which compiled it).

  python benchmarks/kernel_resources.py                      # SiT S/B/XL widths, bf16
  python benchmarks/kernel_resources.py --dims 1152,1000 --dtypes bf16,fp32 --check
  python benchmarks/kernel_resources.py --gemm               # + the Triton GEMM configs

--check exits 1 when a kernel fails to compile or spills registers (beyond a few bytes).
Must run in a process that has not imported Triton for the interpreter (TRITON_INTERPRET=1
makes @triton.jit build interpreter objects): this script sets TRITON_INTERPRET=0 itself.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported (see the docstring)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# sm_90 limits (CUDA C Programming Guide, compute capability 9.0), for the occupancy column.
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024

# ptxas sometimes parks a loop-invariant scalar or two on the stack (8 bytes seen in the
# bias+GELU backward at 48 registers, reloaded once per tile); a register-pressure spill is
# hundreds of bytes (the Triton GEMM's backward epilogue: 24-1752). --check allows the former.
SPILL_TOLERANCE_B = 16

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODEL_DIMS = {"S": 384, "B": 768, "L": 1024, "XL": 1152}


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports a fixed target, device 0 and stream 0, so
    kernels compile for that target on a machine without a GPU (nothing can launch)."""

    def __init__(self, arch: int, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, warp_size)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Patches JITFunction.run to compile only (warmup=True) and records each compiled kernel
    with the label of the call that asked for it."""

    def __init__(self):
        self.records = []
        self.label = ""
        self._orig = JITFunction.run

    def __enter__(self):
        rec = self

        def run(fn, *args, grid, warmup, **kwargs):
            try:
                kernel = rec._orig(fn, *args, grid=grid, warmup=True, **kwargs)
                rec.records.append((rec.label, fn, kwargs, kernel, None))
            except Exception as e:  # a compile error is a result, not a crash of the tool
                rec.records.append((rec.label, fn, kwargs, None, f"{type(e).__name__}: {e}"))
            return None

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._orig
        return False


def _tools_dir() -> Path:
    return Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"


def available() -> str | None:
    """None when this machine can compile sm_90 cubins and read them, else why not."""
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
    except Exception as e:
        return f"triton has no NVIDIA backend ({e})"
    for tool in ("ptxas", "cuobjdump"):
        if not (_tools_dir() / tool).exists():
            return f"triton's bundled {tool} is missing ({_tools_dir()})"
    return None


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cubin_resources(cubin: bytes) -> dict:
    """{function: (regs, stack, static shared, local)} read from a cubin by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_tools_dir() / "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return {m.group(1): tuple(int(m.group(i)) for i in range(2, 6)) for m in _RES.finditer(out)}


def occupancy_warps(regs: int, num_warps: int, shared: int) -> int:
    """Resident warps per SM allowed by registers (allocated per warp in units of 256),
    shared memory and the per-SM warp/block limits."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_warps = MAX_WARPS_PER_SM // num_warps
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK)
    return min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM) * num_warps


# ------------------------------------------------------------------ what gets compiled
def _row_ops(N, T, D, dtype):
    """(label, thunk) per host function of the row-wise ops at one shape and dtype."""
    adaln = importlib.import_module("sra_fast.kernels.adaln_norm")
    gres = importlib.import_module("sra_fast.kernels.gated_residual")
    align = importlib.import_module("sra_fast.kernels.align_loss")
    x = torch.randn(N, T, D).to(dtype)
    v = torch.randn(N, D).to(dtype)
    g = torch.randn(N)
    calls = [
        ("adaln_norm fwd", lambda: adaln.adaln_norm_fwd(x, v, v, 1e-6)),
        ("adaln_norm bwd", lambda: adaln.adaln_norm_bwd(x, x, v, 1e-6)),
        ("gated_residual fwd", lambda: gres.gated_residual_fwd(x, v, x)),
        ("gated_residual bwd", lambda: gres.gated_residual_bwd(x, v, x)),
        ("gated_residual_adaln_norm fwd",
         lambda: gres.gated_residual_adaln_norm_fwd(x, v, x, v, v, 1e-6)),
        # with and without a gradient of h from its other users (HAS_DH)
        ("gated_residual_adaln_norm bwd",
         lambda: gres.gated_residual_adaln_norm_bwd(x, x, x, v, x, v, 1e-6)),
        ("gated_residual_adaln_norm bwd (no dh)",
         lambda: gres.gated_residual_adaln_norm_bwd(None, x, x, v, x, v, 1e-6)),
    ]
    if dtype == torch.float32:   # what bf16 autocast runs: fp32 stream, bf16 normalized out
        b = torch.randn(N, T, D).to(torch.bfloat16)
        bf = torch.bfloat16
        calls += [
            ("adaln_norm fwd (bf16 out)", lambda: adaln.adaln_norm_fwd(x, v, v, 1e-6, bf)),
            ("adaln_norm bwd (bf16 dout)", lambda: adaln.adaln_norm_bwd(b, x, v, 1e-6)),
            ("gated_residual_adaln_norm fwd (bf16 y, out)",
             lambda: gres.gated_residual_adaln_norm_fwd(x, v, b, v, v, 1e-6, bf)),
            ("gated_residual_adaln_norm bwd (bf16 y, dout)",
             lambda: gres.gated_residual_adaln_norm_bwd(x, b, x, v, b, v, 1e-6)),
        ]
    for kind in align.KINDS:
        stats = torch.ones(3, N, D) if kind == "cos-released" else torch.empty(0)
        calls += [(f"align_loss[{kind}] fwd", lambda k=kind: align.align_loss_fwd(x, x, k)),
                  (f"align_loss[{kind}] bwd",
                   lambda k=kind, st=stats: align.align_loss_bwd(g, x, x, st, k))]
    return calls


def _bias_act_ops(M, H, dtype):
    la = importlib.import_module("sra_fast.kernels.linear_act")
    a = torch.randn(M, H).to(dtype)
    b = torch.randn(H).to(dtype)
    calls = []
    for act, name in ((la.ACT_SILU, "silu"), (la.ACT_GELU_TANH, "gelu_tanh")):
        calls += [(f"bias_act[{name}] fwd", lambda act=act: la.bias_act_fwd(a, b, act)),
                  (f"bias_act[{name}] bwd", lambda act=act: la.bias_act_bwd(a, b, a, act))]
    return calls


def _gemm_ops(M, N, K, dtype):
    """Every autotune config of the Triton GEMM (+ bias/activation epilogue), per mode."""
    la = importlib.import_module("sra_fast.kernels.linear_act")
    a = torch.randn(M, K).to(dtype)
    b = torch.randn(K, N).to(dtype)
    bias = torch.randn(N).to(dtype)
    o = torch.empty(M, N, dtype=dtype)
    part = torch.empty(M, N, dtype=torch.float32)
    calls = []
    for mode in (0, 1):
        for cfg in la._gemm_configs(mode):
            kw = dict(cfg.kwargs)
            tag = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            for act, name in ((la.ACT_SILU, "silu"), (la.ACT_GELU_TANH, "gelu_tanh")):
                def call(mode=mode, act=act, kw=kw, cfg=cfg):
                    la._matmul_act_kernel[(1,)](
                        a, b, bias, o, o, o, part, M, N, K, a.stride(0), a.stride(1),
                        b.stride(0), b.stride(1), MODE=mode, ACT=act, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages, **kw)
                calls.append((f"gemm[{name},{'fwd' if mode == 0 else 'bwd'}] {tag} "
                              f"w{cfg.num_warps} s{cfg.num_stages}", call))
    return calls


def collect(dims, dtypes, arch, N=4, T=32, gemm=False, bias_act=True):
    """Compile every kernel for the given widths and dtypes; one row per compiled kernel.
    N and T only size the CPU tensors: the launch constants depend on D (and N*T for the
    token-chunk count, a runtime argument), so small N and T give the same cubins."""
    from triton.runtime import driver
    previous = driver._active  # None unless something set one; restored below
    driver.set_active(CompileOnlyDriver(arch))
    rows = []
    seen = set()
    try:
        with Recorder() as rec:
            for D in dims:
                for dt_name in dtypes:
                    dt = DTYPES[dt_name]
                    calls = _row_ops(N, T, D, dt)
                    if bias_act:
                        calls += _bias_act_ops(N * T, 2 * D, dt)
                    for label, call in calls:
                        rec.label = f"{label} D={D} {dt_name}"
                        try:
                            call()
                        except Exception as e:
                            rec.records.append((rec.label, None, {}, None,
                                                f"host: {type(e).__name__}: {e}"))
            if gemm:  # the projector's first GEMM shape: (M, 2D) = (M, D) @ (D, 2D)
                for D in dims:
                    for dt_name in [d for d in dtypes if d != "fp32"]:
                        for label, call in _gemm_ops(256, 2 * D, D, DTYPES[dt_name]):
                            rec.label = f"{label} K={D} {dt_name}"
                            call()
    finally:
        driver._active = previous
    for label, fn, kwargs, kernel, err in rec.records:
        name = getattr(fn, "__name__", "?") if fn is not None else "?"
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        row = {"call": label, "kernel": name,
               "consts": " ".join(f"{k}={v}" for k, v in sorted(consts.items())),
               "warps": "", "regs": "", "spill_b": "", "smem_b": "", "occ_warps": "",
               "error": err or ""}
        if kernel is not None:
            md = kernel.metadata
            res = cubin_resources(kernel.asm["cubin"])
            regs, stack, static_smem, local = res.get(md.name, next(iter(res.values())))
            smem = max(int(md.shared), static_smem)
            row.update(warps=md.num_warps, regs=regs, spill_b=local + stack, smem_b=smem,
                       occ_warps=occupancy_warps(regs, md.num_warps, smem))
            if kernel.hash in seen:   # the same specialization asked for twice
                continue
            seen.add(kernel.hash)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="384,768,1152,1000",
                    help="feature widths D (SiT-S/B/XL: 384,768,1152; 1000: an odd one)")
    ap.add_argument("--dtypes", default="bf16", help="comma list of bf16,fp16,fp32")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100)")
    ap.add_argument("--gemm", action="store_true", help="also every Triton GEMM config")
    ap.add_argument("--no-bias-act", action="store_true", help="skip the bias+act kernels")
    ap.add_argument("--row-config", default=None, metavar="TILE,EPT",
                    help="row kernels' tile elements and elements per thread "
                         "(kernels._common.set_row_config; default: the kernels' own)")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if any kernel fails to compile or spills")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"kernel_resources: cannot compile for the GPU here: {why}")
        return 2
    dims = [int(d) for d in args.dims.split(",")]
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {tuple(DTYPES)}")
    if args.row_config:
        tile, ept = (int(v) for v in args.row_config.split(","))
        importlib.import_module("sra_fast.kernels._common").set_row_config(tile, ept)
    rows = collect(dims, dtypes, args.arch, gemm=args.gemm, bias_act=not args.no_bias_act)
    print(f"triton {triton.__version__}, target sm_{args.arch}, torch {torch.__version__} "
          f"(compiled here, not run; occupancy: resident warps per SM of {MAX_WARPS_PER_SM})")
    cols = ["call", "kernel", "consts", "warps", "regs", "spill_b", "smem_b", "occ_warps"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths))
              + (f"  ERROR {r['error']}" if r["error"] else ""))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
    spilled = [r for r in rows if not r["error"] and r["spill_b"] > SPILL_TOLERANCE_B]
    failed = [r for r in rows if r["error"]]
    bad = failed + spilled
    print(f"{len(rows)} kernels compiled; {len(failed)} failed; {len(spilled)} spill more "
          f"than {SPILL_TOLERANCE_B} bytes")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
