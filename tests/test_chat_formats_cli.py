"""`unipeft train` on chat data, every format end to end (detected, named in the start summary, evaluated), and
--packing (trains: the loss falls; refused clearly for virtual-token methods and non-causal tasks), on a tiny
random Llama with SmolLM2's tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
import torch

from test_cli import FAST, _jsonl, cli, cli_in_process, fails

COLORS = ["blue", "red", "green", "grey"]


def _chat(c):
    return [{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": f"The sky is {c}. Its color?"},
            {"role": "assistant", "content": c}]


ROWS = {
    "messages": [{"messages": _chat(c)} for c in COLORS * 4],
    "sharegpt": [{"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                     "value": m["content"]} for m in _chat(c)]} for c in COLORS * 4],
    "prompt-completion": [{"prompt": f"The sky is {c}. Its color?", "completion": c} for c in COLORS * 4],
    "alpaca": [{"instruction": "Say the color.", "input": f"The sky is {c}.", "output": c} for c in COLORS * 4],
    "text": [{"text": f"the {c} fox jumps over the lazy dog"} for c in COLORS * 4],
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from unipeft.cli.embedded import embedded_path

    root = tmp_path_factory.mktemp("chat")
    tok = AutoTokenizer.from_pretrained(str(embedded_path()))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True, initializer_range=0.2))  # logits that can move
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    (root / "data").mkdir()
    for name, rows in ROWS.items():
        _jsonl(root / "data" / f"{name}.jsonl", rows)
    return root


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_trains_end_to_end(ws, fmt):
    out = ws / "runs" / fmt
    data = ws / "data" / f"{fmt}.jsonl"
    p = cli("train", "--model", ws / "llama", "--train", data, "--eval", data, "--output", out, *FAST,
            "--max-new-tokens", "3", "--gen-samples", "2", cwd=ws)
    assert f"format {fmt})" in p.stdout  # detected and named in the start summary
    res = json.loads((out / "eval_results.json").read_text())
    assert res["eval_loss"] > 0 and res["steps"] == 3
    meta = json.loads((out / "adapter" / "unipeft_task.json").read_text())
    assert meta["format"] == fmt
    if fmt != "text":
        assert "exact_match" in res  # references: the last assistant turn


def test_packing_trains_and_the_loss_falls(ws):
    out = ws / "runs" / "packed"
    p = cli("train", "--model", ws / "llama", "--train", ws / "data" / "messages.jsonl", "--output", out,
            "--packing", "--max-length", "128", "--batch-size", "1", "--max-steps", "12", "--log-every", "1",
            "--lr", "5e-2", "--warmup", "0", "--scheduler", "constant", cwd=ws)
    assert "16 examples, 0 truncated to 128 tokens, packed into" in p.stdout
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses


@pytest.mark.parametrize("args,phrases", [
    (["--method", "prompt_tuning"], ["--packing cannot be used with", "virtual tokens"]),
    (["--task", "seq-cls"], ["--packing is for causal-lm training"]),
])
def test_packing_refusals(ws, capsys, args, phrases):
    p = cli_in_process("train", "--model", ws / "llama", "--train", ws / "data" / "messages.jsonl", "--output",
                       ws / "runs" / "refused", "--packing", *FAST, *args, cwd=ws, capsys=capsys)
    fails(p, *phrases)


def test_messages_without_a_chat_template_say_how_to_fix(ws, capsys, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ws / "llama"))
    tok.chat_template = None
    model = tmp_path / "notemplate"
    for f in (ws / "llama").iterdir():
        (model / f.name).parent.mkdir(exist_ok=True)
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (model / f.name).write_bytes(f.read_bytes())
    tok.save_pretrained(model)
    p = cli_in_process("train", "--model", model, "--train", ws / "data" / "messages.jsonl", "--output",
                       tmp_path / "run", *FAST, cwd=ws, capsys=capsys)
    fails(p, "has no chat template", "--chat-template chatml")
