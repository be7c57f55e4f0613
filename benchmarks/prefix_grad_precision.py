"""How far our prefix tuning's and HF PEFT's fp32 gradients are from the fp64 gradient, on the embedded SmolLM2-135M
(MLP-reparameterized prefix of 10 tokens, right-padded batch of 4 x 48 random ids, response-style masked labels).

Why: in the full bench, ours and HF PEFT's E2E prefix tuning start from the same loss and part after the first
AdamW step. Adam's first update is about lr * sign(g) per component, so fp32 rounding differences in the gradient
become lr-sized parameter differences. This measures the rounding: each fp32 gradient's max error relative to the
largest component of the fp64 gradient (ours in fp64; HF PEFT's forward is the same math).

    .venv/bin/python benchmarks/prefix_grad_precision.py [--out benchmarks/results/prefix_grad_precision.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import unipeft
from unipeft.cli.embedded import load_embedded


def grads(lib: str, dtype=torch.float32):
    torch.manual_seed(0)
    base = load_embedded()[0]
    base.config.use_cache = False
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=512)
    torch.manual_seed(1)
    if lib == "hf":
        import peft
        m = peft.get_peft_model(base, peft.PrefixTuningConfig(**kw))
    else:
        m = unipeft.get_peft_model(base, unipeft.PrefixTuningConfig(**kw))
    m = m.to(dtype).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 40000, (4, 48), generator=g)
    am = torch.ones_like(ids)
    am[1, 30:] = 0
    am[3, 20:] = 0
    labels = ids.masked_fill(am == 0, -100)
    labels[:, :3] = -100
    loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
    loss.backward()
    named = sorted(((tuple(p.shape), p.grad.double()) for p in m.parameters() if p.requires_grad), key=lambda t: t[0])
    return loss.item(), named


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/prefix_grad_precision.json")
    args = ap.parse_args(argv)
    ref_loss, ref = grads("ours", torch.float64)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}
    for name, lib in (("unipeft_fp32", "ours"), ("hf_peft_fp32", "hf")):
        loss, g = grads(lib)
        out[name] = {"loss_abs_err": abs(loss - ref_loss),
                     "grad_max_rel_err": {str(s): ((a - b).abs().max() / b.abs().max()).item()
                                          for (s, a), (_, b) in zip(g, ref)}}
        print(name, json.dumps(out[name]), flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
