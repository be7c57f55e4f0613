"""LoRA on a bf16 base vs the same run on an fp32 base: the loss curves, with fp32 adapters (the default,
`autocast_adapter_dtype=True`) and with adapters in bf16 (`autocast_adapter_dtype=False`, the old behaviour).

SmolLM2-135M-Instruct (embedded), LoRA r=8 on q,k,v,o, AdamW lr 2e-5, batches of 4×64 tokens of E2E NLG
references, CPU. The same data order and the same initial adapter (seeded) in every run.

    .venv/bin/python benchmarks/dtype_curve.py --steps 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(base_dtype: torch.dtype, autocast: bool, steps: int, texts: list[str], lr: float, tiny: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import unipeft
    from unipeft.cli.embedded import embedded_path

    path = str(embedded_path())
    tok = AutoTokenizer.from_pretrained(path)
    if tiny:  # a random 2-layer Llama with SmolLM2's tokenizer: seconds instead of minutes on a busy CPU
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16)).to(base_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype)
    torch.manual_seed(0)
    cfg = unipeft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft = unipeft.get_peft_model(model, cfg, autocast_adapter_dtype=autocast)
    peft.train()
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        rows = texts[4 * i: 4 * i + 4]
        b = tok(rows, return_tensors="pt", padding="max_length", truncation=True, max_length=64)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = peft(**b, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Llama instead of SmolLM2-135M")
    ap.add_argument("--out", default=str(HERE / "results" / "dtype_curve.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    data = HERE.parent.parent / "shared" / "data" / "e2e_nlg" / "train.jsonl"
    texts = [json.loads(ln)["human_reference"] for ln in data.open() if ln.strip()][: 4 * args.steps]
    curves = {"fp32_base": run(torch.float32, True, args.steps, texts, args.lr, args.tiny),
              "bf16_base_fp32_adapters": run(torch.bfloat16, True, args.steps, texts, args.lr, args.tiny),
              "bf16_base_bf16_adapters": run(torch.bfloat16, False, args.steps, texts, args.lr, args.tiny)}
    ref = curves["fp32_base"]
    summary = {k: {"mean_abs_diff_vs_fp32": round(sum(abs(a - b) for a, b in zip(v, ref)) / len(ref), 4),
                   "final_5_mean": round(sum(v[-5:]) / 5, 4)} for k, v in curves.items()}
    out = {"model": "tiny" if args.tiny else "smollm2", "steps": args.steps, "lr": args.lr, "curves": curves,
           "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
