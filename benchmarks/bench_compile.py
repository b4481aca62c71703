"""Cold torch.compile time of the training step, by compile scope (TrainStep(compile_scope=)).

Each scope runs in a fresh process with empty inductor caches (no FX-graph or autograd
cache): `first_step_s` is the first step, which compiles the student and the teacher's
forward; `step_ms` the median of the next steps (wall time, synchronized on a GPU; eager
step, no CUDA graph, so that the two scopes' host-side differences show).

  blocks  one compiled function runs every student block (the trainer's default): compiled
          once whatever the depth
  model   the whole student compiled, as torch.compile(model)

  python benchmarks/bench_compile.py --model SiT-XL/2 --batch 64          # on a GPU
  python benchmarks/bench_compile.py --model SiT-S/2 --res 128 --batch 4  # CPU, inductor C++
  python benchmarks/bench_compile.py --quick                              # CI smoke test

Rows are appended to benchmarks/results/bench_compile.csv with card, versions, date and git
revision; the table is printed last.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent))

from common import append_csv, env_info, print_table  # noqa: E402

SCOPES = ("blocks", "model")
DEFAULT_CSV = _HERE / "results" / "bench_compile.csv"


def _one(args) -> dict:
    """One scope, in this (fresh) process: build, compile on the first step, time the rest."""
    from torch._dynamo.utils import counters

    from bench_step import blocks_for, build
    from sra_fast import ops
    from sra_fast.objective import SRAConfig, SRAObjective, make_ema
    from sra_fast.ops.attention import use_attention_backend
    from sra_fast.step import TrainStep, make_optimizer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    kernels = args.kernels if cuda else "ref"   # the CPU would run Triton's interpreter
    with ops.use_backend(kernels), use_attention_backend("auto" if cuda else "math"):
        torch.manual_seed(0)
        model = build(args.model, args.res, device, args.quick)
        bs, bt = blocks_for(args.model, model.depth)
        ema = make_ema(model)
        obj = SRAObjective.for_model(model, SRAConfig(block_out_s=bs, block_out_t=bt))
        opt = make_optimizer(model, lr=1e-4)
        step = TrainStep(model, ema, obj, opt, precision="bf16",
                         generator=torch.Generator(device).manual_seed(0),
                         compile=args.mode, compile_backend=args.backend,
                         compile_scope=args.one)
        g = torch.Generator(device).manual_seed(1)
        x = torch.randn(args.batch, model.in_channels, model.input_size, model.input_size,
                        device=device, generator=g)
        y = torch.randint(0, model.num_classes, (args.batch,), device=device, generator=g)

        def timed() -> float:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(x, y, 0.5)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        first = timed()
        times = [timed() for _ in range(args.steps)]
    return {"first_step_s": first, "step_ms": 1e3 * statistics.median(times),
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "depth": model.depth}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SiT-XL/2")
    ap.add_argument("--res", type=int, default=256, help="image pixels (latents: res / 8)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mode", default="default", help="torch.compile mode")
    ap.add_argument("--backend", default="inductor", help="dynamo backend")
    ap.add_argument("--kernels", default="auto", help="fused-op backend on a GPU")
    ap.add_argument("--scopes", default=",".join(SCOPES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke test: tiny SiT, batch 4, aot_eager, 2 timed steps")
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--one", choices=SCOPES, help=argparse.SUPPRESS)   # the child's scope
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.res, args.batch, args.backend, args.steps = ("tiny-SiT", 64, 4,
                                                                     "aot_eager", 2)
    if args.one:   # the child: one JSON line
        print("RESULT " + json.dumps(_one(args)), flush=True)
        return []
    scopes = [s for s in args.scopes.split(",") if s]
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        ap.error(f"unknown scope(s) {bad}; choose from {SCOPES}")
    info = env_info(args.device)
    rows = []
    for scope in scopes:
        row = {"model": args.model, "res": args.res, "batch": args.batch, "mode": args.mode,
               "backend": args.backend, "scope": scope}
        with tempfile.TemporaryDirectory(prefix="sra-fast-inductor-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache,
                       TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0",
                       PYTHONPATH=os.pathsep.join([str(_HERE.parent),
                                                   os.environ.get("PYTHONPATH", "")]))
            argv_child = [sys.executable, str(Path(__file__).resolve()),
                          *(argv if argv is not None else sys.argv[1:]), "--one", scope]
            p = subprocess.run(argv_child, env=env, capture_output=True, text=True)
        res = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not res:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            row["status"] = f"failed (exit {p.returncode}): {tail[0][:200]}"
        else:
            row.update(json.loads(res[-1][len("RESULT "):]), status="ok")
        row.update(info)
        rows.append(row)
    append_csv(args.csv, rows)
    print(f"{info['card']} | torch {info['torch']} | triton {info['triton']} | "
          f"{info['date']} | git {info['git']}")
    print_table(rows, ["model", "res", "batch", "backend", "scope", "depth", "graphs",
                       "graph_breaks", "first_step_s", "step_ms", "status"])
    return rows


if __name__ == "__main__":
    main()
