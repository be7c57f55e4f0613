"""Where LoRA's time over the frozen floor goes, part by part, on one GPU: each thin product of a LoRA linear at the
1B and 8B shapes of benchmarks/gpu.py (tokens = batch × 2048), timed alone with its effective memory bandwidth, and
the optimizer step over the LoRA parameter list (AdamW foreach, as gpu.py's standard call, and fused).

    python benchmarks/gpu_lora_parts.py [--shapes 1b 8b] [--json OUT.json]
    python benchmarks/gpu_lora_parts.py --device cpu --tokens 256   # a dry run of the code (times mean nothing)

Products of one linear (x: tokens × in, g: tokens × out, A: r × in, B: out × r, z = x·Aᵀ, gz = g·B):
    z = x·Aᵀ (forward), gz = g·B, ∂B = gᵀ·z, ∂A = gzᵀ·x, gz·A (the low-rank part of ∂x); base x·Wᵀ for scale.
`grouped` rows stack the A's of the linears reading one x (q|k|v, gate|up): one product for r·3 or r·2 outputs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {  # hidden, kv width, intermediate, layers, tokens
    "1b": dict(h=2048, kv=512, ff=8192, layers=16, tokens=8 * 2048),
    "8b": dict(h=4096, kv=1024, ff=14336, layers=32, tokens=4 * 2048),
}
R = 16
DEV = "cuda"


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _ms(fn, runs=20, warmup=3) -> float:
    """Median ms of fn: CUDA events on the GPU, wall time on a dry run."""
    for _ in range(warmup):
        fn()
    _sync()
    ts = []
    for _ in range(runs):
        if DEV != "cuda":
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
            continue
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return sorted(ts)[runs // 2]


def linears(s: dict) -> dict:
    h, kv, ff = s["h"], s["kv"], s["ff"]
    return {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, ff), "up": (h, ff), "down": (ff, h)}


def parts(shape: str, tokens: int | None = None) -> dict:
    s = SHAPES[shape]
    N, dt = tokens or s["tokens"], torch.bfloat16
    out, per_layer = {}, 0.0
    for name, (d_in, d_out) in linears(s).items():
        x = torch.randn(N, d_in, device=DEV, dtype=dt)
        g = torch.randn(N, d_out, device=DEV, dtype=dt)
        W = torch.randn(d_out, d_in, device=DEV, dtype=dt) / d_in ** 0.5
        A = torch.randn(R, d_in, device=DEV, dtype=dt)
        B = torch.randn(d_out, R, device=DEV, dtype=dt)
        z, gz = x @ A.t(), g @ B
        row = {
            "z=x·At": (_ms(lambda: x @ A.t()), x.numel() * 2),
            "gz=g·B": (_ms(lambda: g @ B), g.numel() * 2),
            "dB=gt·z": (_ms(lambda: g.t() @ z), g.numel() * 2),
            "dA=gzt·x": (_ms(lambda: gz.t() @ x), x.numel() * 2),
            "gz·A": (_ms(lambda: gz @ A), x.numel() * 2),
            "base x·Wt": (_ms(lambda: x @ W.t()), None),
        }
        out[name] = {k: {"ms": round(ms, 4), "GB/s": round(b / ms / 1e6) if b else None} for k, (ms, b) in row.items()}
        per_layer += sum(ms for k, (ms, _) in row.items() if k != "base x·Wt")
        del x, g, W, A, B, z, gz
    grouped = {}
    for name, (d_in, k) in {"qkv": (s["h"], 3), "gate|up": (s["h"], 2)}.items():
        x = torch.randn(N, d_in, device=DEV, dtype=dt)
        A = torch.randn(R * k, d_in, device=DEV, dtype=dt)
        gz = torch.randn(N, R * k, device=DEV, dtype=dt)
        grouped[name] = {"z=x·At": round(_ms(lambda: x @ A.t()), 4), "dA=gzt·x": round(_ms(lambda: gz.t() @ x), 4),
                         "gz·A": round(_ms(lambda: gz @ A), 4),
                         "add (tokens×in)": round(_ms(lambda: x.add_(x)), 4)}
        del x, A, gz
    return {"linears": out, "grouped": grouped, "thin_ms_per_layer": round(per_layer, 3),
            "thin_ms_per_step": round(per_layer * s["layers"], 2)}


def optimizer(shape: str) -> dict:
    s = SHAPES[shape]
    params = []
    for _ in range(s["layers"]):
        for d_in, d_out in linears(s).values():
            params += [torch.zeros(R, d_in, device=DEV, requires_grad=True),
                       torch.zeros(d_out, R, device=DEV, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    res = {"tensors": len(params), "params": sum(p.numel() for p in params)}
    for label, kw in {"foreach (default)": {}, "fused": {"fused": True}}.items():
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
        ms = _ms(opt.step)
        res[label] = {"ms (cuda events)": round(ms, 3)}
        walls = []
        for _ in range(10):
            _sync()
            t = time.perf_counter()
            opt.step()
            _sync()
            walls.append(time.perf_counter() - t)
        res[label]["ms (wall, synced)"] = round(1e3 * sorted(walls)[5], 3)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["1b", "8b"], choices=sorted(SHAPES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=None, help="rows of x and g (default: the shape's batch × 2048)")
    args = ap.parse_args(argv)
    global DEV
    DEV = args.device
    res = {"gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else DEV, "torch": torch.__version__}
    for shape in args.shapes:
        res[shape] = {"parts": parts(shape, args.tokens), "optimizer": optimizer(shape)}
        print(json.dumps({shape: res[shape]}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
