"""The parameter update of one training step alone: AdamW + EMA (+ the teacher's bf16 copy).

Question answered: is the one-pass update (sra_fast.ext.FusedAdamWEMA, TrainStep
ema_impl="adamw") faster than torch's fused AdamW followed by the EMA pass, and how close is
each to the copy bandwidth on the bytes it must move? Providers, all on the parameter list
of a real model (fp32 parameters, gradients, moments, EMA; a bf16 shadow of every matrix):
  adamw+lerp  torch's fused AdamW (capturable, grad_scale + found_inf as the step passes
              them), then one lerp per EMA tensor and the shadow copy (ema_impl="foreach")
  adamw+fema  torch's fused AdamW, then sra_fast.ext.FusedEMA (ema_impl="fused")
  one-pass    sra_fast.ext.FusedAdamWEMA (ema_impl="adamw")
Each update is captured in a CUDA graph and its replays are timed (GPU time alone, as in
the captured step). Bytes counted per parameter: AdamW reads p, g, m, v and writes p, m, v
and (with grad_scale) g; the EMA pass reads ema and p and writes ema (+ 2 for a shadow, +6
for the copy's read of the EMA and write); the one pass reads p, g, m, v, ema and writes p,
m, v, ema (+2). Prints a table last; rows appended to results/results.csv.

  python benchmarks/bench_update.py --model SiT-XL/2
  python benchmarks/bench_update.py --quick          # tiny CPU smoke test (eager timing)
"""
import argparse
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402

from common import (append_csv, bench_ms, env_info, measure_copy_bandwidth_gbs,  # noqa: E402
                    print_table)

PROVIDERS = ("adamw+lerp", "adamw+fema", "one-pass")


def make_state(model_name, device, quick):
    """(params, ema, shadows, optimizer) with random values and gradients."""
    from sra_fast.models import SiT, build_model
    with torch.device("meta"):
        m = (SiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2,
                 num_classes=10) if quick else build_model(model_name, input_size=32))
    g = torch.Generator(device=device).manual_seed(0)   # drawn on the device: 675M values
    params, ema, shadows = [], [], []
    for name, p in m.named_parameters():
        t = torch.nn.Parameter(torch.randn(p.shape, generator=g, device=device) * 0.02,
                               requires_grad=p.requires_grad)
        params.append(t)
        ema.append(t.detach().clone())
        shadows.append(torch.empty(p.shape, dtype=torch.bfloat16, device=device)
                       if p.dim() == 2 else None)
    for t in params:
        if t.requires_grad:
            t.grad = torch.randn(t.shape, generator=g, device=device) * 1e-3
    opt = torch.optim.AdamW([t for t in params if t.requires_grad], lr=1e-4, fused=True,
                            capturable=device.type == "cuda")
    return params, ema, shadows, opt


def make_update(provider, params, ema, shadows, opt, device):
    """A no-argument callable running one update (skipped never; clip folded as grad_scale)."""
    from sra_fast import ext
    lr = torch.tensor(1e-4, device=device)
    found_inf = torch.zeros((), device=device)
    grad_scale = torch.ones((), device=device)
    w = torch.tensor(1e-4, device=device)
    for gr in opt.param_groups:
        gr["lr"] = lr if device.type == "cuda" else 1e-4
    if provider == "one-pass":
        fused = ext.FusedAdamWEMA(opt, params, ema, shadows)
        if not fused.fused:
            raise RuntimeError(f"the extension is not used: {fused.fallback_reason}")
        return lambda: fused.step(lr, found_inf, grad_scale, w), fused

    def adamw():
        opt.found_inf, opt.grad_scale = found_inf, grad_scale
        opt.step()
    if provider == "adamw+fema":
        fema = ext.FusedEMA(ema, params, shadows)
        if not fema.fused:
            raise RuntimeError(f"the extension is not used: {fema.fallback_reason}")
        return lambda: (adamw(), fema.step(w)), None
    pairs = [(s, e) for s, e in zip(shadows, ema) if s is not None]

    def lerp():
        adamw()
        torch._foreach_lerp_(ema, [p.detach() for p in params], [w] * len(ema))
        torch._foreach_copy_([s for s, _ in pairs], [e for _, e in pairs])
    return lerp, None


def update_bytes(provider, params, shadows):
    n_tr = sum(p.numel() for p in params if p.requires_grad)
    n_all = sum(p.numel() for p in params)
    n_sh = sum(s.numel() for s in shadows if s is not None)
    if provider == "one-pass":   # trained: reads p g m v ema, writes p m v ema; frozen: lerp
        return 36 * n_tr + 12 * (n_all - n_tr) + 2 * n_sh
    adamw = 32 * n_tr                 # reads p g m v, writes p m v and the unscaled g
    # the EMA pass: 12 per tensor element, and the shadow written by it (2) or by a copy that
    # re-reads the EMA (6)
    return adamw + 12 * n_all + (6 if provider == "adamw+lerp" else 2) * n_sh


def time_update(fn, device, quick, commit=None):
    if device.type != "cuda":
        return bench_ms(fn, warmup=1, rep=3 if quick else 10, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    if commit is not None:
        commit.commit()
    torch.cuda.synchronize(device)
    return bench_ms(graph.replay, warmup=3, rep=20, device=device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="SiT-XL/2")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model on CPU, eager timing")
    ap.add_argument("--csv", default=None, help="CSV to append to (default results/results.csv; "
                    "--quick writes none unless given)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        ap.error(f"unknown providers {bad}; choose from {PROVIDERS}")
    from sra_fast import ext
    env = env_info(device)
    copy_gbs = measure_copy_bandwidth_gbs(device, nbytes=(1 << 24) if args.quick else (1 << 30))
    print(f"# {env['card']} | torch {env['torch']} | git {env['git']} | copy {copy_gbs:.1f} GB/s")
    rows, ref, path = [], None, None
    write_csv = args.csv or not args.quick
    try:   # SIGINT (gpu_check's time limit): keep the rows measured and print the table
        for prov in providers:
            if prov != "adamw+lerp":   # the extension, built on first need (adamw+lerp first)
                ext.load(jit=True)
            params, ema, shadows, opt = make_state(args.model, device, args.quick)
            base = {"bench": "update", "model": "quick" if args.quick else args.model,
                    "provider": prov, "params_m": sum(p.numel() for p in params) / 1e6}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn, commit = make_update(prov, params, ema, shadows, opt, device)
                    ms = time_update(fn, device, args.quick, commit)
                nbytes = update_bytes(prov, params, shadows)
                gbs = nbytes / (ms * 1e-3) / 1e9
                row = {**base, "ms": ms, "gb": nbytes / 1e9, "gbs": gbs,
                       "pct_copy": 100 * gbs / copy_gbs}
                ref = ms if prov == "adamw+lerp" else ref
                if ref:
                    row["vs_adamw_lerp"] = ref / ms
                del fn, commit
            except Exception as e:   # keep the other providers' numbers
                row = {**base, "ms": "n/a", "note": f"{type(e).__name__}: {e}"[:160]}
            rows.append(row)
            if write_csv:   # as measured: a run killed by its time limit keeps them
                path = append_csv(args.csv, [{**env, "copy_gbs": copy_gbs, **row}])
            del params, ema, shadows, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        print("# interrupted: the table below holds what was measured before")
    if path is not None:
        print(f"# appended {len(rows)} rows to {path}")
    print(f"\n{env['card']} | update of {args.model if not args.quick else 'a tiny SiT (quick)'}"
          f" | timing: {'CUDA-graph replay' if device.type == 'cuda' else 'eager (CPU)'}")
    print_table(rows, ["provider", "params_m", "ms", "gb", "gbs", "pct_copy", "vs_adamw_lerp",
                       "note"])
    return rows


if __name__ == "__main__":
    main()
