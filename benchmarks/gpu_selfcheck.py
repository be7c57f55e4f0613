"""CUDA self-checks of the GPU fast paths whose CPU fallbacks the test suite covers: each prints the max error of
the fast path against the plain one (and a step time where it is about speed). One GPU, a minute or two.

    python benchmarks/gpu_selfcheck.py [--only stream host_embedding chunked_loss loss_kernels host_forward fp8 dataparallel
                                            liger] [--json OUT.json]

- stream: NF4 layers streamed with the next layer prefetched on a side stream vs streamed without prefetch vs
  resident (loss and LoRA gradients; s/step of each; how many loads the prefetch served).
- host_embedding: input embeddings on the host (pinned gather, asynchronous copy) vs on the GPU (logits).
- chunked_loss: the accelerator path of the chunked causal-LM loss (ignored rows masked, no host read) vs full-logits
  cross-entropy (loss and gradients), with prompt-masked labels.
- cli_syncs: `unipeft train` (tiny Llama, bf16) with torch's CUDA sync debug mode on inside each step: how many
  synchronizing calls a step makes and where; the frozen/trainable dtypes and the start summary's device line.
- host_forward: LoRA computed inside the host linears' GEMMs (the CUDA default) vs by hooks on their outputs (bf16
  loss and LoRA gradients).
- dataparallel: torch.nn.DataParallel over every visible GPU (transformers' Trainer on a multi-GPU machine without a
  launcher) for HF PEFT and unipeft LoRA, against one GPU; needs a multi-GPU kind (nvidia-h100-x2).
- liger: unipeft.kernels.apply_liger on a LoRA model vs the same model before (loss and LoRA gradients, bf16); skipped
  with a line when liger-kernel is not installed.
- loss_kernels: at the 1B and 8B heads (bf16, 128k vocabulary, a quarter of the rows ignored), the chunked loss's torch
  path and liger's fused linear cross-entropy (as apply_liger has the loss call it) against fp32 full-logits
  cross-entropy: loss error, max relative error of the hidden-state gradient, and ms per forward + backward of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

DEV = "cuda"  # --device cpu: a dry run of the code (no prefetch, no pinned memory, no liger)
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _llama(layers=4, hidden=256, vocab=1024, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                        max_position_embeddings=512, tie_word_embeddings=tied))


def _loss_and_grads(peft, ids, labels=None):
    peft.zero_grad(set_to_none=True)
    loss = peft(input_ids=ids, labels=ids if labels is None else labels).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in peft.named_parameters()
                                   if p.requires_grad}


def _timed(step, warmup: int, runs: int):
    """step()'s last result and its median wall time in ms over `runs` synchronized calls after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        _sync()
        t = time.perf_counter()
        result = step()
        _sync()
        times.append(time.perf_counter() - t)
    return result, sorted(times)[runs // 2] * 1e3


def _max_err(a, b) -> dict:
    (la, ga), (lb, gb) = a, b
    g = max(((ga[k] - gb[k]).abs().max() / gb[k].abs().max().clamp_min(1e-30)).item() for k in ga)
    return {"loss_abs_err": (la - lb).abs().item(), "grad_max_rel_err": g}


def check_stream() -> dict:
    from unipeft import LoraConfig, get_peft_model
    from unipeft.quant import load_quantized

    with tempfile.TemporaryDirectory() as d:
        big = DEV == "cuda"  # the CPU dry run: a small model
        _llama(layers=8 if big else 3, hidden=1024 if big else 64, vocab=4096).save_pretrained(d)
        ids = torch.randint(0, 4096, (2, 512 if big else 16), generator=torch.Generator().manual_seed(1)).to(DEV)
        out = {}
        for name, stream, prefetch in (("resident", False, None), ("streamed", True, False),
                                       ("prefetched", True, True)):
            model = load_quantized(d, "nf4", compute_dtype=torch.bfloat16, device=DEV, stream=stream)
            if stream:
                model._unipeft_stream.prefetch = prefetch and DEV == "cuda"
            torch.manual_seed(2)
            peft = get_peft_model(model, LoraConfig(**LORA))
            peft.train()
            peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            with torch.autocast(DEV, torch.bfloat16):
                res = _loss_and_grads(peft, ids)
                _sync()
                t = time.perf_counter()
                for _ in range(5):
                    _loss_and_grads(peft, ids)
                _sync()
            out[name] = {"result": res, "s_per_step": (time.perf_counter() - t) / 5}
            if stream:
                out[name]["prefetched_loads"] = model._unipeft_stream.prefetched
                out[name]["loads"] = model._unipeft_stream.loads
            del peft, model
            torch.cuda.empty_cache()
    report = {"prefetched_vs_streamed": _max_err(out["prefetched"]["result"], out["streamed"]["result"]),
              "prefetched_vs_resident": _max_err(out["prefetched"]["result"], out["resident"]["result"])}
    for name, v in out.items():
        report[name] = {k: v2 for k, v2 in v.items() if k != "result"}
    return report


def check_host_embedding() -> dict:
    from unipeft import embeddings_on_host

    model = _llama(tied=False).to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, 1024, (4, 256), device=DEV)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        embeddings_on_host(model, DEV)
        got = model(input_ids=ids).logits.float()
        try:  # host ids: no device-to-host wait (a caller that has them on the host can pass them)
            host_ids = (model(input_ids=ids.cpu()).logits.float() - ref).abs().max().item()
        except Exception as e:
            host_ids = f"{type(e).__name__}: {str(e)[:200]}"
    return {"max_abs_err": (got - ref).abs().max().item(), "host_ids_max_abs_err": host_ids,
            "table_pinned": model.get_input_embeddings().weight.is_pinned()}


def check_chunked_loss() -> dict:
    import torch.nn.functional as F

    from unipeft.training.losses import chunked_lm_loss, reads_are_free

    assert reads_are_free(torch.device(DEV)) == (DEV == "cpu")
    torch.manual_seed(0)
    h = torch.randn(4, 300, 64, device=DEV, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5000, 64, device=DEV, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5000, (4, 300), device=DEV)
    y[:, :100] = -100
    loss = chunked_lm_loss(h, W, y, chunk=128)
    gh, gW = torch.autograd.grad(loss, (h, W))
    ref = F.cross_entropy((h @ W.T)[:, :-1].reshape(-1, 5000), y[:, 1:].reshape(-1), ignore_index=-100)
    rh, rW = torch.autograd.grad(ref, (h, W))
    return {"loss_abs_err": (loss - ref).abs().item(), "grad_h_max_abs_err": (gh - rh).abs().max().item(),
            "grad_W_max_abs_err": (gW - rW).abs().max().item()}


def check_loss_kernels() -> dict:
    import torch.nn.functional as F

    from unipeft.kernels import liger_available
    from unipeft.kernels.liger import liger_linear_cross_entropy
    from unipeft.training.losses import chunked_lm_loss

    out = {}
    shapes = {"1b": (8 * 2048, 2048), "8b": (4 * 2048, 4096)} if DEV == "cuda" else {"tiny": (512, 64)}
    vocab = 128256 if DEV == "cuda" else 1000
    kernels = {"torch": None}
    if liger_available() and DEV == "cuda":
        kernels["liger"] = liger_linear_cross_entropy
    for shape, (rows, d) in shapes.items():
        torch.manual_seed(0)
        dt = torch.bfloat16 if DEV == "cuda" else torch.float32
        h = (torch.randn(1, rows, d, device=DEV) * 2).to(dt).requires_grad_()
        W = (torch.randn(vocab, d, device=DEV) / d ** 0.5).to(dt)
        y = torch.randint(0, vocab, (1, rows), device=DEV)
        y[:, : rows // 4] = -100
        # reference: fp32 logits of the same bf16 operands, HF's shift
        ref = F.cross_entropy((h.float() @ W.float().T)[0, :-1], y[0, 1:], ignore_index=-100)
        (rh,) = torch.autograd.grad(ref, h)
        rh = rh.float()
        for name, kernel in kernels.items():
            def step():
                loss = chunked_lm_loss(h, W, y, kernel=kernel)
                return loss, torch.autograd.grad(loss, h)[0]
            (loss, gh), ms = _timed(step, warmup=2, runs=5)
            out[f"{shape}_{name}"] = {
                "loss_abs_err": (loss.float() - ref).abs().item(),
                "grad_h_max_rel_err": ((gh.float() - rh).abs().max() / rh.abs().max()).item(),
                "ms": round(ms, 2)}
        del h, W, ref, rh
    return out


def check_host_forward() -> dict:
    """LoRA inside the host linears' GEMMs (positions.weight.HostForward) vs hooks on their outputs, bf16 on the GPU:
    loss and LoRA gradients, and how many linear calls took the fused path; `grouped`: a second pass, where q|k|v and
    gate|up are computed in one node each (positions/host_group.py, learned in the first pass)."""
    from unipeft import LoraConfig, functional, get_peft_model
    from unipeft.positions import weight

    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    fused_on = weight.FUSED_HOST_DEVICES if DEV == "cuda" else frozenset({"cpu"})
    peft = get_peft_model(_llama().to(DEV, dt), LoraConfig(**LORA)).train()
    ids = torch.randint(0, 1024, (4, 256), device=DEV)
    weight.FUSED_HOST_DEVICES = frozenset()
    ref = _loss_and_grads(peft, ids)
    weight.FUSED_HOST_DEVICES = fused_on
    calls, real, real_group = [], functional.linear_low_rank, functional.linears_low_rank
    functional.linear_low_rank = lambda *a: calls.append("one") or real(*a)
    functional.linears_low_rank = lambda *a: calls.append("group") or real_group(*a)
    try:
        got = _loss_and_grads(peft, ids)
        first = len(calls)
        grouped = _loss_and_grads(peft, ids)
    finally:
        functional.linear_low_rank, functional.linears_low_rank = real, real_group
    return {**_max_err(got, ref), "fused_calls": first, "grouped": _max_err(grouped, ref),
            "grouped_calls": calls[first:].count("group"), "single_calls": calls[first:].count("one")}


def check_fp8() -> dict:
    """The FP8 frozen linear (quant/fp8.py) at the 1B shape's linears, against the bf16 linear it was quantized from:
    output and input-gradient relative error (Frobenius) against fp32 products, and forward + backward time of each.
    The quantization of x and g is torch.compile'd on CUDA; its reference path is checked against it too."""
    from unipeft.quant import quantized_linear
    from unipeft.quant.fp8 import quantize_rows, quantize_rows_reference

    out = {}
    rows = 8 * 2048 if DEV == "cuda" else 256
    shapes = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048)}
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    for name, (k, n) in shapes.items():
        torch.manual_seed(0)
        W = (torch.randn(n, k, device=DEV) / k ** 0.5).to(dt)
        x = torch.randn(rows, k, device=DEV).to(dt).requires_grad_()
        g = torch.randn(rows, n, device=DEV).to(dt)
        lin = torch.nn.Linear(k, n, bias=False, device=DEV, dtype=dt).requires_grad_(False)
        lin.weight.copy_(W)
        q = quantized_linear(W, None, "fp8", dt, device=DEV)
        ref_y = x.detach().float() @ W.float().T
        ref_dx = g.float() @ W.float()
        res = {}
        for label, mod in (("bf16", lin), ("fp8", q)):
            def step():
                xi = x.detach().requires_grad_()  # a new tensor per step, as in training: x is quantized every time
                y = mod(xi)
                return y, torch.autograd.grad(y, xi, g)[0]
            (y, dx), ms = _timed(step, warmup=3, runs=7)
            res[label] = {"ms": round(ms, 3),
                          "y_rel_err": ((y.float() - ref_y).norm() / ref_y.norm()).item(),
                          "dx_rel_err": ((dx.float() - ref_dx).norm() / ref_dx.norm()).item()}
        res["speedup"] = round(res["bf16"]["ms"] / res["fp8"]["ms"], 3)
        for fn_name, fn in (("quantize_rows_us", quantize_rows), ("quantize_rows_eager_us", quantize_rows_reference)):
            for _ in range(3):
                fn(g)
            _sync()
            t = time.perf_counter()
            for _ in range(20):
                fn(g)
            _sync()
            res[fn_name] = round((time.perf_counter() - t) / 20 * 1e6, 1)  # of g (rows × out), back to back
        qa, sa = quantize_rows(x.detach())
        qb, sb = quantize_rows_reference(x.detach())
        res["quantize_rows_max_abs_diff"] = (qa.float() * sa - qb.float() * sb).abs().max().item()
        out[name] = res
        del W, x, g, lin, q
    return out


def check_liger() -> dict:
    from unipeft import LoraConfig, get_peft_model
    from unipeft.kernels import apply_liger, liger_available

    if not liger_available() or DEV != "cuda":
        return {"skipped": "liger-kernel is not installed"}
    model = _llama().to(DEV, torch.bfloat16)
    torch.manual_seed(2)
    peft = get_peft_model(model, LoraConfig(**LORA))
    peft.train()
    ids = torch.randint(0, 1024, (4, 256), device=DEV)
    ref = _loss_and_grads(peft, ids)
    apply_liger(peft)
    got = _loss_and_grads(peft, ids)
    return {**_max_err(got, ref), "forward_kept": "forward" not in peft.get_base_model().__dict__}


def _word_tokenizer(folder, words):
    """A word-level fast tokenizer made in code (no hub, no embedded model needed on the GPU machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.save_pretrained(folder)
    return tok


def check_cli_syncs() -> dict:
    """`unipeft train` for 7 steps on the GPU with torch's sync debug mode on inside each training step: every
    synchronizing CUDA call there is counted with where it came from (the CLI's own reads happen only between steps,
    at logging/checkpoint boundaries). Also reports the frozen/trainable dtypes and the start summary's device line."""
    import contextlib
    import io
    import random
    import warnings
    from collections import Counter

    from unipeft.cli import loop, main

    words = [f"w{i}" for i in range(200)]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        tok = _word_tokenizer(f"{d}/model", words)
        m = _llama(layers=4, hidden=256, vocab=len(tok))
        m.config.pad_token_id, m.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        m.save_pretrained(f"{d}/model")
        with open(f"{d}/train.jsonl", "w") as f:
            for _ in range(64):  # equal lengths: no padding, so transformers' own mask check is the only other read
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")
        sites, per_step, seen = Counter(), [], {}
        orig = loop.Trainer.train_step

        def train_step(self, micro):
            seen.setdefault("frozen", sorted({str(p.dtype) for p in self.model.parameters() if not p.requires_grad}))
            seen.setdefault("trainable", sorted({str(p.dtype) for p in self.model.parameters() if p.requires_grad}))
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                if DEV == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = orig(self, micro)
                finally:
                    if DEV == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in ws if "synchroniz" in str(w.message)]
            per_step.append(len(syncs))
            sites.update(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in syncs)
            return out

        loop.Trainer.train_step = train_step
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                code = main(["train", "--model", f"{d}/model", "--task", "causal-lm", "--train", f"{d}/train.jsonl",
                             "--batch-size", "8", "--max-length", "64", "--max-steps", "7", "--log-every", "3",
                             "--output", f"{d}/run"])
        finally:
            loop.Trainer.train_step = orig
    device = next((x.strip() for x in buf.getvalue().splitlines() if "device" in x and "precision" in x), "")
    return {"exit": code, "syncs_per_step": per_step, "sites": dict(sites.most_common(10)), **seen,
            "device_line": device}


def check_dataparallel() -> dict:
    """torch.nn.DataParallel over every visible GPU (what transformers' Trainer does on a multi-GPU machine without a
    launcher), for HF PEFT and unipeft LoRA: loss and LoRA gradients of one step against the same model on one GPU,
    or the error. Needs two GPUs (a multi-GPU kind); skipped with a line on one."""
    n = torch.cuda.device_count() if DEV == "cuda" else 0
    if n < 2:
        return {"skipped": f"{n} GPU(s): DataParallel needs two"}
    import peft as hf

    import unipeft
    out = {}
    ids = torch.randint(0, 1024, (2 * n, 64), device=DEV)
    for lib in (hf, unipeft):
        model = lib.get_peft_model(_llama().to(DEV), lib.LoraConfig(**LORA)).train()
        ref = _loss_and_grads(model, ids)
        try:
            dp = torch.nn.DataParallel(model)
            model.zero_grad(set_to_none=True)
            loss = dp(input_ids=ids, labels=ids).loss.mean()
            loss.backward()
            got = (loss.detach().float(), {k: p.grad.detach().float().clone() for k, p in model.named_parameters()
                                           if p.requires_grad and p.grad is not None})
            missing = [k for k in ref[1] if k not in got[1]]
            out[lib.__name__] = {**_max_err((got[0], {k: got[1][k] for k in ref[1] if k in got[1]}), ref),
                                 "params_without_grad": len(missing)}
        except Exception as e:
            out[lib.__name__] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


CHECKS = {"stream": check_stream, "host_embedding": check_host_embedding, "chunked_loss": check_chunked_loss,
          "cli_syncs": check_cli_syncs, "loss_kernels": check_loss_kernels,
          "host_forward": check_host_forward, "fp8": check_fp8, "dataparallel": check_dataparallel,
          "liger": check_liger}  # liger last: it patches llama's modeling module for the rest of the process


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=list(CHECKS))
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    global DEV
    DEV = args.device
    results = {}
    for name in args.only or list(CHECKS):
        try:
            results[name] = CHECKS[name]()
        except Exception as e:  # one failing check must not hide the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps(results[name], default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
