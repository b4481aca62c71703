"""Fused ops vs the reference they replace: eager reference, torch.compile of the reference,
and the Triton kernels, at the SiT-B/2 and SiT-XL/2 shapes.

Question answered: does each fused op beat torch.compile, and how close is it to the card's
copy bandwidth (element-wise ops, GB/s on the op's own bytes) or matmul rate (projector/mlp,
TFLOP/s)? Modes fwd, bwd (backward alone, graph retained), fwd+bwd, and infer (forward under
torch.no_grad on inputs that need no gradient: the teacher's and the sampler's case, where
the MLP takes its inference path). Prints a table last
and appends rows to benchmarks/results/results.csv as they are measured.

  python benchmarks/bench_ops.py                       # all ops, both models, CUDA
  python benchmarks/bench_ops.py --op adaln_norm,align_loss --mode fwd+bwd --model XL/2
  python benchmarks/bench_ops.py --quick               # tiny CPU smoke test (a few seconds)

Providers: eager (the reference op), compile (torch.compile of the reference), triton (ours;
projector/mlp with their default first GEMM), triton-gemm (projector/mlp with gemm="triton"),
triton@TILExEPT (ours with another row-kernel launch shape; --row-configs).

Timings (--timing, default both; a `timing` column in the table and the CSV):
  eager  each call issued from Python and timed with CUDA events around it: host cost
         (dispatch, autograd, launches) included whenever it exceeds the GPU work, as in an
         un-captured training step.
  graph  the provider's call sequence (fwd, bwd or fwd+bwd) captured once in a
         torch.cuda.CUDAGraph (warmed up on a side stream, static inputs, gradients returned
         by torch.autograd.grad into the graph's static outputs) and its replays timed with
         CUDA events: GPU time alone, what the CUDA-graph training step sees. CUDA only
         (skipped with a note on CPU). A capture that fails gives an 'n/a' row with the
         reason instead of stopping the run.
"""
import argparse
import math
import os
import sys
import time

_T_PROCESS = time.monotonic()   # --budget-s counts from here: start-up is part of the budget
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402

from common import (append_csv, bench_ms, env_info, measure_copy_bandwidth_gbs,  # noqa: E402
                    measure_matmul_tflops, print_table)

OPS = ("adaln_norm", "gated_residual", "gated_residual_adaln_norm", "align_loss", "projector",
       "mlp")
GEMM_OPS = ("projector", "mlp")
MODES = ("fwd", "bwd", "fwd+bwd", "infer")
TIMINGS = ("eager", "graph")
MODELS = {"XL/2": (64, 256, 1152), "B/2": (256, 256, 768)}   # (N, T, D) per GPU batch
QUICK_SHAPE = (2, 16, 64)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", default="all", help=f"comma list of {OPS} or 'all'")
    p.add_argument("--mode", default=None,
                   help=f"comma list of {MODES} or 'all' (default all; --quick: fwd+bwd)")
    p.add_argument("--model", default="all", help=f"comma list of {tuple(MODELS)} or 'all'")
    p.add_argument("--providers", default=None,
                   help="comma list of eager,compile,triton,triton-gemm (default: all; "
                        "--quick: eager,triton)")
    p.add_argument("--align-kind", default="cos",
                   help="alignment loss kind(s), comma list or 'all'")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny shape {QUICK_SHAPE}, few reps: a smoke test that runs on CPU")
    p.add_argument("--csv", default=None,
                   help="CSV to append to (default results/results.csv; --quick writes none "
                        "unless given)")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--timing", default="both", choices=TIMINGS + ("both",),
                   help="eager: per-call Python-issued timing (host cost included); graph: "
                        "CUDA-graph replay (GPU time alone, CUDA only); both (default)")
    p.add_argument("--row-configs", default=None, metavar="TILExEPT,...",
                   help="time the triton provider once per row-kernel launch shape, e.g. "
                        "4096x16,2048x8,2048x4 (tile elements x elements per thread; "
                        "kernels._common.set_row_config); rows get provider triton@TILExEPT")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new measurements after this many seconds (the table "
                        "and CSV still cover what was measured; cases run in the order given)")
    return p.parse_args()


def _pick(value, allowed, name):
    if value == "all":
        return list(allowed)
    picked = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in picked if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {name} {bad}; choose from {tuple(allowed)}")
    return picked


# ------------------------------------------------------------------------ op cases
def make_case(op, N, T, D, dtype, device, kind):
    """(ref_fn, kernel_fn(gemm) or None, inputs, grad_mask, bytes_fwd, bytes_bwd, flops_fwd).

    Bytes are the op's own minimal traffic: every input read once, every output written once
    (for the backward: saved inputs and output grads read, input grads written; dx of a
    residual is the incoming gradient itself and costs nothing). flops_fwd only for GEMM ops.
    """
    from sra_fast.ops import reference as R
    g = torch.Generator(device="cpu").manual_seed(0)
    e = torch.empty((), dtype=dtype).element_size()

    def r(*s, sc=1.0):
        return (torch.randn(*s, generator=g) * sc).to(device=device, dtype=dtype)
    act, vec = N * T * D * e, N * D * e
    if op == "adaln_norm":
        ins = [r(N, T, D), r(N, D), r(N, D)]
        return (lambda x, sh, sc: R.adaln_norm_ref(x, sh, sc, R.LN_EPS),
                lambda gemm: (lambda x, sh, sc: _K().adaln_norm(x, sh, sc, R.LN_EPS)),
                ins, [True] * 3, 2 * act + 2 * vec, 3 * act + 3 * vec, 0)
    if op == "gated_residual":
        ins = [r(N, T, D), r(N, D), r(N, T, D)]
        return (R.gated_residual_ref, lambda gemm: _K().gated_residual, ins, [True] * 3,
                3 * act + vec, 3 * act + 2 * vec, 0)
    if op == "gated_residual_adaln_norm":
        ins = [r(N, T, D), r(N, D), r(N, T, D), r(N, D), r(N, D)]
        return (lambda *a: R.gated_residual_adaln_norm_ref(*a, R.LN_EPS),
                lambda gemm: (lambda *a: _K().gated_residual_adaln_norm(*a, R.LN_EPS)),
                ins, [True] * 5, 4 * act + 3 * vec, 6 * act + 5 * vec, 0)
    if op == "align_loss":
        ins = [r(N, T, D), r(N, T, D)]
        return (lambda s, t: R.align_loss_ref(s, t, kind),
                lambda gemm: (lambda s, t: _K().align_loss(s, t, kind)),
                ins, [True, False], 2 * act + 4 * N, 3 * act + 4 * N, 0)
    if op in GEMM_OPS:
        H = (2 if op == "projector" else 4) * D
        M = N * T
        ins = [r(N, T, D), r(H, D, sc=D ** -0.5), r(H), r(D, H, sc=H ** -0.5), r(D)]
        ref = R.projector_ref if op == "projector" else R.mlp_ref

        def kern(gemm, op=op):
            f = getattr(_K(), op)
            return lambda *a: f(*a, gemm=gemm)
        w = (2 * H * D + H + D) * e
        return (ref, kern, ins, [True] * 5, 2 * M * D * e + w, 3 * M * D * e + 2 * w,
                2 * 2 * M * D * H)
    raise ValueError(op)


def _K():
    import sra_fast.kernels as K
    return K


def parse_row_configs(text):
    """'4096x16,2048x8' -> [(4096, 16), (2048, 8)]."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if item:
            try:
                tile, ept = (int(v) for v in item.split("x"))
            except ValueError:
                raise SystemExit(f"--row-configs: {item!r} is not TILExEPT (e.g. 2048x8)")
            out.append((tile, ept))
    return out


def set_row_config(cfg):
    """Apply a (tile, elements-per-thread) row launch shape; None restores the default."""
    import importlib
    common = importlib.import_module("sra_fast.kernels._common")
    if not hasattr(set_row_config, "default"):
        set_row_config.default = (common.TILE_ELEMS, common.ELEMS_PER_THREAD)
    common.set_row_config(*(cfg or set_row_config.default))


def triton_runnable(device):
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def make_runner(fn, inputs, grad_mask, mode):
    """A no-argument callable timing `mode` of fn on fresh leaves of `inputs`."""
    if mode == "infer":
        consts = [t.detach().clone() for t in inputs]

        def infer():
            with torch.no_grad():
                return fn(*consts)
        return infer
    leaves = [t.detach().clone().requires_grad_(m) for t, m in zip(inputs, grad_mask)]
    wrt = [t for t in leaves if t.requires_grad]

    def fwd():
        return fn(*leaves)

    def outs_and_grads(out):
        outs = out if isinstance(out, tuple) else (out,)
        return outs, [torch.randn_like(o) for o in outs]

    if mode == "fwd":
        return fwd
    out = fwd()
    outs, gouts = outs_and_grads(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, wrt, gouts, retain_graph=True)

    def fwd_bwd():
        o = fwd()
        return torch.autograd.grad(o if isinstance(o, tuple) else (o,), wrt, gouts)
    return fwd_bwd


def make_graph_runner(fn, inputs, grad_mask, mode, device, warmup_calls=3):
    """(replay, graph): `mode` of fn captured in a CUDA graph; replay() reruns it.

    The forward for mode bwd and every warm-up call run on the capture stream itself, so the
    autograd engine (which runs each backward op on its forward op's stream) issues the
    captured backward on that stream too. Inputs are static leaves; gradients come back from
    torch.autograd.grad as the graph's static outputs, so nothing accumulates across replays.
    """
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        body = make_runner(fn, inputs, grad_mask, mode)  # bwd: its forward runs on `stream`
        for _ in range(warmup_calls):
            body()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        static_out = body()
    torch.cuda.synchronize(device)

    def replay(_keep=static_out):  # the graph's outputs stay alive as long as replay does
        graph.replay()
    return replay, graph


def time_one(fn, ins, mask, mode, timing, device, warmup, rep):
    """Median ms of one provider/mode under one timing method."""
    if timing == "eager":
        return bench_ms(make_runner(fn, ins, mask, mode), warmup=warmup, rep=rep, device=device)
    caller_stream = torch.cuda.current_stream(device)
    try:
        replay, graph = make_graph_runner(fn, ins, mask, mode, device)
    except Exception:
        try:  # let a half-done capture settle before the next measurement
            torch.cuda.synchronize(device)
        except Exception:
            pass
        # a capture that failed in capture_end leaves its stream current
        torch.cuda.set_stream(caller_stream)
        raise
    try:
        return bench_ms(replay, warmup=max(1, warmup // 5), rep=rep, device=device)
    finally:
        del graph, replay


def main():
    args = parse_args()
    device = torch.device(args.device)
    ops = _pick(args.op, OPS, "op")
    modes = _pick(args.mode or ("fwd+bwd" if args.quick else "all"), MODES, "mode")
    models = ["quick"] if args.quick else _pick(args.model, MODELS, "model")
    kinds = _pick(args.align_kind, ("cos", "cos-released", "smooth-l1", "l1", "l2"), "kind")
    default_prov = "eager,triton" if args.quick else "eager,compile,triton,triton-gemm"
    providers = _pick(args.providers or default_prov,
                      ("eager", "compile", "triton", "triton-gemm"), "provider")
    if any(p.startswith("triton") for p in providers) and device.type == "cpu":
        # CPU tensors reach the kernels only through Triton's interpreter, which must be
        # chosen before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    warmup, rep = (1, 2) if args.quick else (args.warmup, args.rep)
    dtype = DTYPES[args.dtype]
    timings = list(TIMINGS) if args.timing == "both" else [args.timing]
    row_configs = parse_row_configs(args.row_configs)
    if "graph" in timings and device.type != "cuda":
        print("# graph timing skipped: CUDA graphs need a CUDA device (timing eager only)")
        timings = [t for t in timings if t != "graph"] or ["eager"]

    env = env_info(device)
    copy_gbs = measure_copy_bandwidth_gbs(device)
    mm_tflops = measure_matmul_tflops(device, dtype=dtype, n=1024 if args.quick else 8192)
    print(f"# {env['card']} | torch {env['torch']} | triton {env['triton']} | "
          f"CUDA {env['cuda']} | git {env['git']} | {env['date']}")
    print(f"# copy {copy_gbs:.1f} GB/s (read+write), {args.dtype} matmul {mm_tflops:.1f} TFLOP/s")

    rows, t_start, skipped = [], _T_PROCESS, []
    write_csv = not args.no_csv and (args.csv or not args.quick)
    stamp = {**env, "copy_gbs": copy_gbs, "matmul_tflops": mm_tflops}
    n_written, csv_path = 0, None

    def over_budget():
        return args.budget_s is not None and time.monotonic() - t_start > args.budget_s

    interrupted = False
    try:   # SIGINT (gpu_check's time limit): keep what was measured and print the table
        for model in models:
            N, T, D = QUICK_SHAPE if model == "quick" else MODELS[model]
            for op in ops:
                for kind in (kinds if op == "align_loss" else [None]):
                    ref, kern, ins, mask, b_fwd, b_bwd, fl_fwd = make_case(op, N, T, D, dtype,
                                                                           device, kind)
                    fns = {}
                    for prov in providers:
                        if prov == "eager":
                            fns[prov] = ref
                        elif prov == "compile":
                            torch._dynamo.reset()
                            fns[prov] = torch.compile(ref)
                        elif prov.startswith("triton"):
                            if prov == "triton-gemm" and op not in GEMM_OPS:
                                continue
                            if not triton_runnable(device):
                                print(f"# skip {prov}: CPU tensors need TRITON_INTERPRET=1")
                                continue
                            fn = kern("triton" if prov == "triton-gemm" else None)
                            if prov == "triton" and row_configs:  # (projector/mlp: bias+act)
                                for cfg in row_configs:
                                    fns[f"triton@{cfg[0]}x{cfg[1]}"] = fn
                            else:
                                fns[prov] = fn
                    for mode in modes:
                        for timing in timings:
                            nbytes = {"fwd": b_fwd, "infer": b_fwd, "bwd": b_bwd,
                                      "fwd+bwd": b_fwd + b_bwd}[mode]
                            flops = {"fwd": fl_fwd, "infer": fl_fwd, "bwd": 2 * fl_fwd,
                                     "fwd+bwd": 3 * fl_fwd}[mode]
                            base = {"bench": "ops", "op": op + (f"[{kind}]" if kind else ""),
                                    "model": model, "shape": f"{N}x{T}x{D}", "dtype": args.dtype,
                                    "mode": mode, "timing": timing}
                            times, group = {}, []
                            for prov, fn in fns.items():
                                if over_budget():
                                    skipped.append(f"{op}{f'[{kind}]' if kind else ''}/{model}/"
                                                   f"{mode}/{prov}/{timing}")
                                    continue
                                try:
                                    set_row_config(tuple(int(v) for v in prov.split("@")[1]
                                                         .split("x")) if "@" in prov else None)
                                    ms = times[prov] = time_one(fn, ins, mask, mode, timing,
                                                                device, warmup, rep)
                                    row = {**base, "provider": prov, "ms": ms}
                                    if flops:
                                        tf = flops / (ms * 1e-3) / 1e12
                                        row.update(tflops=tf, pct_matmul=100 * tf / mm_tflops)
                                    else:
                                        gbs = nbytes / (ms * 1e-3) / 1e9
                                        row.update(gbs=gbs, pct_copy=100 * gbs / copy_gbs)
                                except Exception as ex:  # keep the other providers' numbers
                                    why = f"{type(ex).__name__}: {str(ex).splitlines()[0][:160]}" \
                                        if str(ex) else type(ex).__name__
                                    print(f"# {op} {mode} {prov} ({timing}) failed: {why}")
                                    row = {**base, "provider": prov, "ms": "n/a", "note": why}
                                # vs_compile where compile is timed already (else in the table only)
                                row["vs_compile"] = (times["compile"] / row["ms"]) \
                                    if "compile" in times and prov in times else math.nan
                                rows.append(row)
                                group.append(row)
                                # written as measured, so a run killed by its time limit keeps them
                                if write_csv:
                                    csv_path = append_csv(args.csv, [{**stamp, **row}])
                                    n_written += 1
                            for row in group:   # the table's ratio, once compile is timed
                                if "compile" in times and row["provider"] in times:
                                    row["vs_compile"] = times["compile"] / row["ms"]
    except KeyboardInterrupt:
        interrupted = True
        print("# interrupted: the table below holds what was measured before")

    if skipped and not interrupted:
        print(f"# budget of {args.budget_s:.0f} s spent: skipped {len(skipped)} measurements "
              f"({', '.join(skipped[:6])}{', ...' if len(skipped) > 6 else ''})")
    if csv_path is not None:
        print(f"# appended {n_written} rows to {csv_path}")
    print(f"\n{env['card']} | torch {env['torch']} | triton {env['triton']} | git {env['git']}"
          f" | vs_compile = compile ms / provider ms (>1: faster than torch.compile)")
    order = {t: i for i, t in enumerate(TIMINGS)}
    rows.sort(key=lambda r: order[r["timing"]])  # stable: one block per timing, run order kept
    print_table(rows, ["op", "model", "mode", "timing", "provider", "ms", "gbs", "pct_copy",
                       "tflops", "pct_matmul", "vs_compile", "note"])
    if "graph" in timings:
        print("# timing graph = CUDA-graph replay (GPU time alone); eager = per call from "
              "Python (host cost included)")


if __name__ == "__main__":
    main()
