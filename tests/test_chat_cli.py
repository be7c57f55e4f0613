"""`unipeft chat` with stdin piped (a real subprocess): one user turn per line, greedy replies equal to a generate()
call on the same rendered history, each turn's prompt holding the earlier exchanges, and /reset clearing them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from test_cli import ENV, cli_in_process, fails
from test_export import save_adapter, save_base

PROMPT = re.compile(r"--- prompt of turn (\d+) ---\n(.*?)\n--- end of prompt ---", re.S)


def chat(*args, stdin: str, cwd):
    p = subprocess.run([sys.executable, "-m", "unipeft.cli", "chat", *map(str, args)], input=stdin, cwd=cwd,
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return p


def greedy_reply(base, adapter, tok, history, n):
    """The oracle: the same adapter loaded by HF PEFT, greedy generate() on the template-rendered history."""
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    x = torch.tensor([tok(ids, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()


def test_chat_answers_piped_turns_with_history_and_reset(tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoTokenizer

    from transformers import AutoModelForCausalLM

    base = save_base(tmp_path / "llama", tied=False)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():  # special tokens get logit 0, below the largest of ~300 random ones: replies are not empty
        model.lm_head.weight[tok.all_special_ids] = 0
    model.save_pretrained(base)
    run = save_adapter(base, tmp_path / "run")
    p = chat("--adapter", run, "--model", base, "--max-new-tokens", "6", "--system", "be brief", "--show-prompt",
             stdin="hello there\n\nhow are you\n/reset\nthe quick fox\n/exit\nnever read\n", cwd=tmp_path)
    prompts = dict((int(n), text) for n, text in PROMPT.findall(p.stderr))
    assert sorted(prompts) == [1, 2, 3]  # the blank line is skipped, /exit stops before "never read"
    assert "(conversation cleared)" in p.stderr

    system = [{"role": "system", "content": "be brief"}]
    h1 = system + [{"role": "user", "content": "hello there"}]
    assert prompts[1] == tok.apply_chat_template(h1, add_generation_prompt=True, tokenize=False)
    r1 = greedy_reply(base, run / "adapter", tok, h1, 6)
    assert r1, "the reply should not be empty for this test to check the history"
    h2 = h1 + [{"role": "assistant", "content": r1}, {"role": "user", "content": "how are you"}]
    assert prompts[2] == tok.apply_chat_template(h2, add_generation_prompt=True, tokenize=False)  # the 1st exchange
    assert prompts[2].startswith(prompts[1])
    r2 = greedy_reply(base, run / "adapter", tok, h2, 6)
    h3 = system + [{"role": "user", "content": "the quick fox"}]  # after /reset: only the system message
    assert prompts[3] == tok.apply_chat_template(h3, add_generation_prompt=True, tokenize=False)
    r3 = greedy_reply(base, run / "adapter", tok, h3, 6)
    assert "hello there" not in prompts[3]
    assert "".join(p.stdout.split()) == "".join((r1 + r2 + r3).split())  # the streamed replies, in order


def test_chat_refusals(tmp_path, capsys):
    base = save_base(tmp_path / "llama")
    run = save_adapter(base, tmp_path / "run")
    (base / "chat_template.jinja").unlink()
    p = cli_in_process("chat", "--adapter", run, "--model", base, cwd=tmp_path, capsys=capsys)
    fails(p, "has no chat template", "unipeft generate")
    p = cli_in_process("chat", "--adapter", run, "--model", base, "--max-new-tokens", "0", cwd=tmp_path, capsys=capsys)
    fails(p, "--max-new-tokens must be at least 1")


# a template whose end-of-turn marker is ordinary text (as --chat-template chatml is on a tokenizer without the
# <|im_*|> special tokens): training labels "reply [END]", never EOS, so the model goes on to invent the next turn
END_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' [END]\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_chat_stops_at_the_templates_end_of_turn_text(tmp_path, capsys, monkeypatch):
    import io
    import json

    from unipeft.cli import chat as chat_mod

    base = save_base(tmp_path / "llama")
    (base / "chat_template.jinja").unlink()  # the base has no template: the adapter's stored one is used
    run = save_adapter(base, tmp_path / "run")
    (run / "adapter" / "unipeft_task.json").write_text(json.dumps(
        {"task": "causal-lm", "method": "lora", "max_length": 64, "chat": True, "format": "messages",
         "mode": "instruction", "text_columns": ["messages"], "columns": ["messages"], "chat_template": END_TEMPLATE}))
    real_load = chat_mod.load_base_and_adapter

    def load(*a, **k):  # the model's continuation, fixed: the reply, the marker, then an invented user turn
        model, tok, path, task = real_load(*a, **k)

        def generate(input_ids, streamer=None, **kw):
            new = torch.tensor([tok("4 [END]\nuser: invented [END]\n", add_special_tokens=False)["input_ids"]])
            if streamer is not None:
                streamer.put(input_ids[0])
                streamer.put(new[0])
                streamer.end()
            return torch.cat([input_ids, new], 1)

        model.generate = generate
        return model, tok, path, task

    monkeypatch.setattr(chat_mod, "load_base_and_adapter", load)
    monkeypatch.setattr("sys.stdin", io.StringIO("2+2?\nand 3+3?\n"))
    p = cli_in_process("chat", "--adapter", run, "--model", base, "--show-prompt", "--max-new-tokens", "8",
                       cwd=tmp_path, capsys=capsys)
    assert p.returncode == 0, p.stderr[-2000:]
    replies = [ln for ln in p.stdout.splitlines() if ln and "WARNING" not in ln]  # (DeepSpeed's import notice)
    assert replies == ["4", "4"]  # each reply ends at its marker, nothing after it is shown
    prompts = dict((int(n), text) for n, text in PROMPT.findall(p.stderr))
    assert prompts[2] == "user: 2+2? [END]\nassistant: 4 [END]\nuser: and 3+3? [END]\nassistant: "


def test_generation_eval_cuts_chat_replies_at_the_end_of_turn_text():
    """The training/eval generation metrics: a prediction is the reply, not the marker and invented turns after it."""
    from conftest import tiny_llama
    from test_export import tiny_tokenizer
    from unipeft.cli.evaluate import generation_eval
    from unipeft.cli.lm import CausalLM

    tok = tiny_tokenizer()
    tok.chat_template = END_TEMPLATE
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    task = CausalLM.from_data(tok, 64, rows, "data.jsonl", {})
    feats, _ = task.encode(rows, "data.jsonl")
    model = tiny_llama()

    def generate(input_ids, **kw):
        new = tok(["4 [END]\nuser: invented [END]"] * len(input_ids), add_special_tokens=False, return_tensors="pt")
        return torch.cat([input_ids, new["input_ids"]], 1)

    model.generate = generate
    metrics, pairs = generation_eval(model, task, tok, feats, 1, 8, 1)
    assert pairs == [("4", "4")]
    assert metrics["exact_match"] == 1.0


def test_eval_of_a_chatml_adapter_uses_its_template_with_explicit_columns(tmp_path, capsys):
    """An adapter trained with --chat-template chatml on a base without a template: `unipeft eval` renders the rows
    with the stored template whether the columns come from the adapter or from --text-column/--label-column."""
    import json

    from unipeft.cli.chat_data import CHATML

    base = save_base(tmp_path / "llama")
    (base / "chat_template.jinja").unlink()
    run = save_adapter(base, tmp_path / "run")
    (run / "adapter" / "unipeft_task.json").write_text(json.dumps(
        {"task": "causal-lm", "method": "lora", "max_length": 64, "chat": True, "format": "alpaca",
         "mode": "instruction", "text_columns": ["instruction"], "label_column": "output",
         "columns": ["instruction", "output"], "chat_template": CHATML}))
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n"
                            for q, a in [("hello there", "how are you"), ("the quick fox", "jumps over")]))
    losses = []
    for cols in ([], ["--text-column", "instruction", "--label-column", "output"]):
        res = tmp_path / f"res{len(cols)}.json"
        p = cli_in_process("eval", "--adapter", run, "--model", base, "--eval", data, "--gen-samples", "0",
                           "--results", res, *cols, cwd=tmp_path, capsys=capsys)
        assert p.returncode == 0, p.stderr[-2000:]
        losses.append(json.loads(res.read_text())["eval_loss"])
    assert abs(losses[0] - losses[1]) < 1e-6, losses


def test_chat_never_generates_past_the_models_context(tmp_path, capsys, monkeypatch):
    """The tiny base has 128 positions: a reply is capped to the room the prompt leaves (with a note), and a message
    that alone fills the context is refused for that turn, not generated past the positions the model knows."""
    import io

    from unipeft.cli import chat as chat_mod

    base = save_base(tmp_path / "llama")
    run = save_adapter(base, tmp_path / "run")
    real_load = chat_mod.load_base_and_adapter
    asked = []

    def load(*a, **k):
        model, tok, path, task = real_load(*a, **k)

        def generate(input_ids, generation_config=None, max_new_tokens=None, **kw):
            asked.append((input_ids.shape[1], max_new_tokens or generation_config.max_new_tokens))
            return torch.cat([input_ids, torch.tensor([tok("ok", add_special_tokens=False)["input_ids"]])], 1)

        model.generate = generate
        return model, tok, path, task

    monkeypatch.setattr(chat_mod, "load_base_and_adapter", load)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n" + "the quick brown fox " * 40 + "\nhow are you\n"))
    p = cli_in_process("chat", "--adapter", run, "--model", base, "--max-new-tokens", "500", cwd=tmp_path,
                       capsys=capsys)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(asked) == 2 and all(n + new <= 128 and new >= 1 for n, new in asked), asked
    assert "longer than the model's context" in p.stderr and "shorter" in p.stderr
