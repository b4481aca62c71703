"""Training-step throughput: img/s per GPU, step time, peak memory and MFU of one SRA step.

Providers (each a full SRA step: student forward+backward, teacher forward, loss, clip,
fused AdamW, EMA; bf16 autocast; synthetic random latents, never zeros):
  eager-ref       reference ops + PyTorch SDPA, eager, FULL teacher (as the released code runs
                  it): the in-repo baseline
  eager-ref-stop  the same with the teacher stopped at block_out_t (isolates that saving)
  compile         torch.compile (default mode) of the whole reference student and of the
                  stopped teacher; eager optimizer/EMA (fused AdamW, foreach EMA)
  compile-ro      the same with mode="reduce-overhead" (CUDA graphs): the best off-the-shelf
  compile-graph   the reference ops compiled (default mode, the student's blocks: the
                  trainer's --compile-scope) inside ours-graph's one CUDA graph, auto
                  attention (what --kernels ref --compile default --cuda-graph trains with)
  ours-compile-graph  ours-graph with the student's blocks and the teacher compiled
                  (default mode): our fused ops stay custom ops, inductor fuses around them
  ours            sra_fast kernels (auto) + auto attention, stopped teacher, eager step
  ours-t16        ours + bf16 shadow of the teacher's weights
  ours-graph      ours, the whole step captured in one CUDA graph
  ours-graph-t16  ours-graph + bf16 teacher shadow
  ours-graph-fema ours-graph-t16 with ema_impl="fused": EMA lerp + shadow in one pass
  ours-graph-1p   ours-graph-t16 with ema_impl="adamw": AdamW + EMA + shadow in one pass
                  (sra_fast.ext.FusedAdamWEMA: the CUDA extension if built, else its
                  PyTorch reference)
  ours-graph-sync ours-graph with the step's own gradient all-reduce (grad_sync, 25 MB
                  buckets from gradient hooks) over a one-process NCCL group (gloo on CPU):
                  what --cuda-graph costs under torchrun beyond ours-graph, communication
                  time aside (one process has nothing to send)
MFU = (analytic SRA FLOPs per image with the teacher stopped, sra_fast.flops) x img/s /
(bf16 matmul rate measured in the same run): the same useful work for every provider, so MFU
ratios equal img/s ratios. Timing: CUDA events per step, median (benchmarks/common.bench_ms).

  python benchmarks/bench_step.py                                    # defaults below
  python benchmarks/bench_step.py --models SiT-XL/2 --batch SiT-XL/2=64 --providers ours,ours-graph
  python benchmarks/bench_step.py --budget-s 300 --csv out/bench_step.csv
  python benchmarks/bench_step.py --plan "SiT-XL/2@64=compile-ro,ours-graph;SiT-XL/2@32@512=ours-graph"
  python benchmarks/bench_step.py --quick                            # CPU smoke test, tiny model
  python benchmarks/bench_step.py --summarize out/bench_step.csv     # table of the last run
The table is printed last; every configuration is appended to the CSV as soon as it ends (a
killed run keeps its rows), stamped with card, versions, date and git revision.
"""
from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402

from common import (append_csv, bench_ms, env_info, measure_matmul_tflops,  # noqa: E402
                    print_table)

from sra_fast import ops  # noqa: E402
from sra_fast.flops import sra_step_flops_per_image  # noqa: E402
from sra_fast.models import build_model  # noqa: E402
from sra_fast.models.dit import DiT, SiT  # noqa: E402
from sra_fast.objective import SRAConfig, SRAObjective, make_ema  # noqa: E402
from sra_fast.ops.attention import resolve_backend, use_attention_backend  # noqa: E402
from sra_fast.step import TrainStep, make_optimizer  # noqa: E402

PROVIDERS = {
    "eager-ref": dict(ops="ref", attn="sdpa", teacher_full=True),
    "eager-ref-stop": dict(ops="ref", attn="sdpa"),
    "compile": dict(ops="ref", attn="sdpa", compile="default", scope="model"),
    "compile-ro": dict(ops="ref", attn="sdpa", compile="reduce-overhead", scope="model"),
    "compile-graph": dict(ops="ref", attn="auto", compile="default", graph=True),
    "ours-compile-graph": dict(ops="auto", attn="auto", compile="default", graph=True),
    "ours": dict(ops="auto", attn="auto"),
    "ours-t16": dict(ops="auto", attn="auto", teacher_bf16=True),
    "ours-graph": dict(ops="auto", attn="auto", graph=True),
    "ours-graph-t16": dict(ops="auto", attn="auto", graph=True, teacher_bf16=True),
    "ours-graph-fema": dict(ops="auto", attn="auto", graph=True, teacher_bf16=True,
                            ema_impl="fused"),
    "ours-graph-1p": dict(ops="auto", attn="auto", graph=True, teacher_bf16=True,
                          ema_impl="adamw"),
    "ours-graph-sync": dict(ops="auto", attn="auto", graph=True, grad_sync=True),
}


_OWN_GROUP = {"made": False}


def world_of_one(device) -> object:
    """The default process group, made a one-process group here if there is none (NCCL on
    CUDA, gloo on CPU; run_one destroys it again): for the ours-graph-sync provider."""
    import datetime
    import socket
    dist = torch.distributed
    if not dist.is_initialized():
        _OWN_GROUP["made"] = True
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cuda = torch.device(device).type == "cuda"
        dev = torch.device(device)
        if cuda and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if cuda else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=120),
                                **({"device_id": dev} if cuda else {}))
    return dist.group.WORLD
DEFAULT_PROVIDERS = "eager-ref,ours,ours-graph,ours-graph-t16,compile,compile-ro"
DEFAULT_MODELS = "SiT-XL/2,SiT-B/2,DiT-XL/2"
DEFAULT_BATCH = {"SiT-XL/2": 64, "DiT-XL/2": 64, "SiT-L/2": 64, "SiT-B/2": 256,
                 "DiT-B/2": 256, "SiT-S/2": 256}
DEFAULT_BLOCKS = {"SiT-XL/2": (8, 20), "DiT-XL/2": (8, 16), "SiT-B/2": (4, 8),
                  "DiT-B/2": (4, 8)}
DEFAULT_CSV = _HERE / "results" / "bench_step.csv"
QUICK_MODEL = dict(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4,
                   num_classes=10)


def parse_map(text: str, cast) -> dict:
    """'SiT-XL/2=64:32,SiT-B/2=256' -> {'SiT-XL/2': [64, 32], ...}; a bare value -> {'*': [v]}."""
    out = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, val = item.rpartition("=") if "=" in item else ("*", "", item)
        out[key] = [cast(v) for v in val.split(":")]
    return out


def blocks_for(name: str, depth: int) -> tuple[int, int]:
    return DEFAULT_BLOCKS.get(name, (max(1, depth // 4), max(2, (3 * depth) // 4)))


def build(model_name: str, res: int, device, quick: bool):
    if quick:
        cls = DiT if model_name.startswith("tiny-DiT") else SiT
        with torch.device(device):
            return cls(**QUICK_MODEL)
    with torch.device(device):
        return build_model(model_name, input_size=res // 8, num_classes=1000)


def cleanup():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_one(model_name, batch, provider, args, device, peak_tflops, res=None):
    """One configuration (at `res` px, default --res); everything it built is gone (and the
    cache emptied) on return."""
    res = res or args.res
    row = {"model": model_name, "res": res, "batch": batch, "provider": provider}
    try:
        _run_one(row, model_name, batch, provider, args, device, peak_tflops, res)
    finally:
        if PROVIDERS[provider].get("compile"):
            torch._dynamo.reset()
        cleanup()
        if _OWN_GROUP["made"]:   # after the step (and its graph) are gone
            _OWN_GROUP["made"] = False
            torch.distributed.destroy_process_group()
    return row


def _run_one(row, model_name, batch, provider, args, device, peak_tflops, res):
    spec = PROVIDERS[provider]
    is_cuda = torch.device(device).type == "cuda"
    # on CPU the kernels would run in Triton's interpreter: the smoke test times the reference
    kernels = spec["ops"] if is_cuda else "ref"
    try:
        with ops.use_backend(kernels), use_attention_backend(spec["attn"]):
            torch.manual_seed(0)
            model = build(model_name, res, device, args.quick)
            bs, bt = blocks_for(model_name, model.depth)
            row["sra"] = f"{bs}->{bt}"
            ema = make_ema(model)
            obj = SRAObjective.for_model(model, SRAConfig(block_out_s=bs, block_out_t=bt,
                                                          loss_type=args.loss))
            opt = make_optimizer(model, lr=1e-4)
            gen = torch.Generator(device).manual_seed(0)
            mode = spec.get("compile")
            step = TrainStep(model, ema, obj, opt, precision="bf16",
                             grad_clip=1.0, ema_decay=0.9999, generator=gen,
                             cuda_graph=bool(spec.get("graph")),
                             teacher_bf16=bool(spec.get("teacher_bf16")),
                             teacher_full=bool(spec.get("teacher_full")),
                             ema_impl=spec.get("ema_impl", "foreach"),
                             grad_sync=world_of_one(device) if spec.get("grad_sync") else None,
                             compile=mode, compile_scope=spec.get("scope", "blocks"))
            g = torch.Generator(device).manual_seed(1)
            n_cls = model.num_classes
            x0 = torch.randn(batch, model.in_channels, model.input_size, model.input_size,
                             device=device, generator=g)
            y = torch.randint(0, n_cls, (batch,), device=device, generator=g)

            def fn():
                step(x0, y, 0.5)

            if is_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn()                                  # compile / capture / lazy init
            if is_cuda:
                torch.cuda.synchronize()
            row["first_step_s"] = time.perf_counter() - t0
            ms = bench_ms(fn, warmup=max(0, args.warmup - 1), rep=args.steps, device=device)
            stats = step.read_stats()
            flops = sra_step_flops_per_image(model, bs, bt)
            img_s = batch / (ms * 1e-3)
            row.update({
                "ms": ms, "img_s": img_s,
                "peak_gib": (torch.cuda.max_memory_allocated() / 2 ** 30) if is_cuda else float("nan"),
                # what the caching allocator held at most (graph pools, cache): what runs out
                "reserved_gib": (torch.cuda.max_memory_reserved() / 2 ** 30) if is_cuda
                else float("nan"),
                "mfu_pct": 100 * flops * img_s / (peak_tflops * 1e12),
                "tflops": flops * img_s / 1e12,
                "gflop_per_img": flops / 1e9,
                "loss": stats["loss"],
                "status": "ok",
            })
            head_dim = model.hidden_size // model.num_heads
            q = torch.empty(1, 1, 1, head_dim, device=device, dtype=torch.bfloat16)
            notes = [f"attn={resolve_backend(q)}", f"kernels={kernels}"]
            # a provider named for the extension that ran its PyTorch fallback measured
            # something else: said in the status (then no ratio), not only in the notes
            ext_user = step._fused_ema if step._fused_ema is not None else step._adamw_ema
            if ext_user is not None:
                notes.append("ema=" + ("extension" if ext_user.fused else "pytorch-fallback"))
            row["notes"] = " ".join(notes)
            if stats["nonfinite"] or not math.isfinite(stats["loss"]):
                row["status"] = f"NONFINITE ({stats['nonfinite']} of {stats['steps']} steps)"
            elif spec.get("graph") and not step.graph_mode:
                row["status"] = f"eager fallback: {step.graph_refusal}"[:160]
            elif ext_user is not None and not ext_user.fused:
                row["status"] = f"no extension: {ext_user.fallback_reason}"[:160]
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # one failing configuration must not end the benchmark
        if "out of memory" in str(e).lower():
            row["status"] = "OOM"
        else:
            traceback.print_exc()
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:140]}"


class OutOfBudget(BaseException):
    """Raised by the budget alarm inside a configuration that outlived --budget-s (a
    BaseException: run_one's per-configuration `except Exception` must not swallow it)."""


_IN_CONFIG = {"on": False}   # the alarm interrupts a configuration, nothing else


def _budget_alarm(signum, frame):
    if _IN_CONFIG["on"]:
        raise OutOfBudget()


def add_ratios(rows: list[dict]) -> None:
    by_cfg = {}
    for r in rows:
        if r.get("status") == "ok":
            by_cfg.setdefault((r["model"], str(r["res"]), str(r["batch"])), {})[r["provider"]] = float(r["img_s"])
    for r in rows:
        base = by_cfg.get((r["model"], str(r["res"]), str(r["batch"])), {})
        v = float(r["img_s"]) if r.get("status") == "ok" else None
        comp = [base[p] for p in ("compile", "compile-ro") if p in base]
        r["x_eager_ref"] = v / base["eager-ref"] if v and "eager-ref" in base else None
        r["x_compile"] = v / base["compile"] if v and "compile" in base else None
        r["x_best_compile"] = v / max(comp) if v and comp else None


TABLE_COLS = ["model", "res", "batch", "provider", "ms", "img_s", "peak_gib", "reserved_gib",
              "mfu_pct", "x_eager_ref", "x_compile", "x_best_compile", "first_step_s", "status"]


def print_summary(rows: list[dict], info: dict | None = None, peak: float | None = None):
    add_ratios(rows)
    if info:
        print(f"\n== SRA training step: {info['card']} | torch {info['torch']} | triton "
              f"{info['triton']} | CUDA {info['cuda']} | git {info['git']} | {info['date']}")
    if peak:
        kind = "bf16" if "cpu:" not in str(info and info.get("card")) else "fp32"
        print(f"   {kind} matmul ceiling measured in this run: {peak:.2f} TFLOP/s (MFU base)")
    out = []
    for r in rows:
        o = {}
        for c in TABLE_COLS:
            v = r.get(c)
            if isinstance(v, str) and c not in ("model", "provider", "status"):
                try:
                    v = None if v in ("", "None") else (int(v) if v.isdigit() else float(v))
                except ValueError:
                    pass
            o[c] = v
        if isinstance(o.get("status"), str) and len(o["status"]) > 60:
            o["status"] = o["status"][:57] + "..."
        out.append(o)
    print_table(out, TABLE_COLS)


def summarize(path: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"(no rows in {path})")
        return
    run = rows[-1].get("run_id")
    rows = [r for r in rows if r.get("run_id") == run]
    r0 = rows[0]
    info = {k: r0.get(k, "?") for k in ("card", "torch", "triton", "cuda", "git", "date")}
    peak = float(r0["matmul_tflops"]) if r0.get("matmul_tflops") else None
    print_summary(rows, info, peak)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma list (default {DEFAULT_MODELS})")
    ap.add_argument("--batch", default="", help="per model 'SiT-XL/2=64:32,...' or one value "
                    "for all (default: XL 64, B 256)")
    ap.add_argument("--res", type=int, default=256, help="image resolution (latent = res/8)")
    ap.add_argument("--providers", default=None, help=f"comma list of {list(PROVIDERS)} "
                    f"(default {DEFAULT_PROVIDERS})")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (first included)")
    ap.add_argument("--loss", default="cos", help="alignment loss")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting new configurations after this many seconds (0: none)")
    ap.add_argument("--compile-reserve-s", type=float, default=150.0,
                    help="with a budget, skip compile providers when less than this is left")
    ap.add_argument("--after-compile-s", type=float, default=0.0,
                    help="with a budget, a compile configuration is stopped this many seconds "
                         "before the budget's end, and the entries after it still run (0: it "
                         "may take all that is left)")
    ap.add_argument("--csv", default=None, help=f"CSV to append to (default {DEFAULT_CSV}; "
                    "--quick writes none unless given)")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke test: tiny SiT and DiT, batch 8, 3 steps")
    ap.add_argument("--plan", default=None,
                    help="ordered configurations, overriding --models/--batch/--providers: "
                         "'SiT-XL/2@64=eager-ref,ours,ours-graph;SiT-B/2@256=ours;"
                         "SiT-XL/2@32@512=ours-graph' (NAME@BATCH[@RES]; with --budget-s, "
                         "later entries are the ones skipped)")
    ap.add_argument("--summarize", default=None, metavar="CSV",
                    help="only print the table of the last run recorded in CSV")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize)
        return 0

    if args.quick:
        device = "cpu"
        models = (args.models or "tiny-SiT,tiny-DiT").split(",")
        providers = (args.providers or "eager-ref,ours,ours-graph").split(",")
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        args.res = QUICK_MODEL["input_size"] * 8
        default_batch = 8
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        models = (args.models or DEFAULT_MODELS).split(",")
        providers = (args.providers or DEFAULT_PROVIDERS).split(",")
        default_batch = None
        if device == "cpu":
            print("no CUDA device: timing on the CPU (use --quick for the smoke test)")
    batches = parse_map(args.batch, int)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t_start = time.time()
    info = env_info(device)
    # the CPU ceiling in fp32 (bf16 matmul on CPUs without AMX is slow and not what runs)
    peak = measure_matmul_tflops(device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    print(f"device {info['card']}, torch {info['torch']}, triton {info['triton']}; "
          f"bf16 matmul {peak:.1f} TFLOP/s", flush=True)
    run_id = f"{info['date']}-{os.getpid()}"
    # --quick (a CPU smoke test) writes no results unless --csv says where
    csv_path = None if args.no_csv else (args.csv or (None if args.quick else DEFAULT_CSV))
    if args.plan:
        plan = []
        for entry in args.plan.split(";"):
            entry = entry.strip()
            if not entry:
                continue
            head, _, provs = entry.partition("=")
            name, _, rest = head.partition("@")
            b, _, r = rest.partition("@")
            try:
                batch = int(b) if b else (default_batch or DEFAULT_BATCH.get(name, 32))
                res = int(r) if r and not args.quick else args.res
            except ValueError:
                ap.error(f"--plan entry {entry!r}: expected NAME@BATCH[@RES]=PROVIDERS")
            for prov in provs.split(","):
                plan.append((name, batch, prov.strip(), res))
    else:
        plan = [(name, batch, prov, args.res) for name in models
                for batch in (batches.get(name) or batches.get("*")
                              or [default_batch or DEFAULT_BATCH.get(name, 32)])
                for prov in providers]
    bad = [p for _, _, p, _ in plan if p not in PROVIDERS]
    if bad:
        ap.error(f"unknown providers {bad}; choose from {list(PROVIDERS)}")
    rows = []
    # The budget also ends a configuration still running at its end (a cold torch.compile
    # can take minutes): an alarm raises OutOfBudget there, and SIGINT (gpu_check's time
    # limit) ends it the same way; either way the rows so far and the table come out.
    timed = args.budget_s > 0 and hasattr(signal, "setitimer")
    if timed:
        signal.signal(signal.SIGALRM, _budget_alarm)
    stopped = None
    for name, batch, prov, res in plan:
        left = args.budget_s - (time.time() - t_start) if args.budget_s > 0 else math.inf
        compiles = bool(PROVIDERS[prov].get("compile"))
        if stopped or left <= 0 or (compiles and left < args.compile_reserve_s):
            row = {"model": name, "res": res, "batch": batch, "provider": prov,
                   "status": stopped or f"skipped (budget, {max(left, 0):.0f}s left)"}
        else:
            # a cold torch.compile may take minutes: with --after-compile-s it is cut off
            # early enough that the cheaper entries after it still get their turn
            own = compiles and args.after_compile_s > 0 and left > args.after_compile_s
            if timed:
                signal.setitimer(signal.ITIMER_REAL, max(
                    left - (args.after_compile_s if own else 0.0), 0.01))
            print(f"-- {name} {res}px batch {batch}: {prov}", flush=True)
            try:
                _IN_CONFIG["on"] = True
                row = run_one(name, batch, prov, args, device, peak, res)
            except (OutOfBudget, KeyboardInterrupt) as e:
                why = "budget" if isinstance(e, OutOfBudget) else "interrupted"
                if own and isinstance(e, OutOfBudget):
                    why = (f"its limit, {args.after_compile_s:.0f}s before the budget's end; "
                           "the entries after it run")
                else:
                    stopped = f"not run ({why})"
                row = {"model": name, "res": res, "batch": batch, "provider": prov,
                       "status": f"stopped ({why}) after {time.time() - t_start:.0f}s"}
            finally:
                _IN_CONFIG["on"] = False
                if timed:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            print(f"   {row.get('status')}: " + (f"{row['ms']:.2f} ms/step, "
                  f"{row['img_s']:.1f} img/s, peak {row['peak_gib']:.2f} GiB, MFU "
                  f"{row['mfu_pct']:.1f}%, first step {row['first_step_s']:.1f}s"
                  if row.get("status") == "ok" else ""), row.get("notes", ""), flush=True)
        row.update({"run_id": run_id, "matmul_tflops": peak, "steps": args.steps,
                    "warmup": args.warmup, "loss_type": args.loss, **info})
        rows.append(row)
        if csv_path:
            append_csv(csv_path, [row])
    print_summary(rows, info, peak)
    if csv_path:
        print(f"rows appended to {csv_path}")
    print(f"total {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
