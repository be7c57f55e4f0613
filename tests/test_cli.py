"""The `unipeft` command line, through real subprocesses on tiny random models (saved to a temp folder with real
tokenizers: MiniLM's BERT WordPiece, and SmolLM2's BPE with its chat template and the pad token removed).

Each task trains and evaluates from JSONL and CSV; pair classification; string labels; resume after an
interruption reproduces the uninterrupted run; every bad input gives its message, a non-zero exit, no traceback.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# One thread: tiny models gain nothing from more, and lose a lot when the cores are busy.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FAST = ["--batch-size", "4", "--max-steps", "3", "--log-every", "1"]


def cli(*args, cwd, ok=True, env=None, timeout=300):
    p = subprocess.run([sys.executable, "-m", "unipeft.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       env={**ENV, **(env or {})}, timeout=timeout)
    if ok and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def cli_in_process(*args, cwd, capsys):
    """The same entry point in this process (for the many fast bad-input cases): (exit code, stdout, stderr)."""
    from unipeft.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main([str(a) for a in args])
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def fails(p, *phrases, code=None):
    """A bad input: non-zero exit, no traceback, and the message names the problem."""
    assert p.returncode != 0, p.stdout[-2000:]
    if code is not None:
        assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    for phrase in phrases:
        assert phrase in p.stderr, f"{phrase!r} not in:\n{p.stderr[-2000:]}"
    assert "fix:" in p.stderr or code == 130


def _jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _csv(path: Path, rows, sep=","):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny models and data files, made once for this module."""
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              T5Config, T5ForConditionalGeneration)

    from unipeft.cli.embedded import embedded_path, minilm_path

    root = tmp_path_factory.mktemp("cli")
    try:
        bert_tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    except Exception as e:  # pragma: no cover
        pytest.skip(f"MiniLM tokenizer not installed: {e}")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=bert_tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=0))
    bert.save_pretrained(root / "bert")
    bert_tok.save_pretrained(root / "bert")
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=bert_tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=bert_tok.sep_token_id, decoder_start_token_id=0))
    t5.save_pretrained(root / "t5")
    bert_tok.save_pretrained(root / "t5")
    try:
        lm_tok = AutoTokenizer.from_pretrained(str(embedded_path()))
    except Exception as e:  # pragma: no cover
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")
    lm_tok.pad_token = None  # a tokenizer without a pad token: the CLI must handle it
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(lm_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=lm_tok.bos_token_id,
        eos_token_id=lm_tok.eos_token_id, tie_word_embeddings=True))
    llama.save_pretrained(root / "llama")
    lm_tok.save_pretrained(root / "llama")

    d = root / "data"
    d.mkdir()
    pos, neg = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "sad"]
    cls = [{"text": f"a {(pos if i % 2 else neg)[i % 4]} movie", "label": "pos" if i % 2 else "neg"} for i in range(24)]
    _jsonl(d / "cls.jsonl", cls)
    _csv(d / "cls.csv", cls)
    pair = [{"s1": f"it is {pos[i % 4]}", "s2": f"it is {(pos if i % 2 else neg)[i % 4]}", "label": i % 2}
            for i in range(24)]
    _csv(d / "pair.csv", pair)
    _jsonl(d / "pair.jsonl", pair)
    tok = [{"tokens": ["Alice", "met", "Bob", "in", "Paris"], "ner_tags": ["B-PER", "O", "B-PER", "O", "B-LOC"]},
           {"tokens": ["New", "York", "is", "big"], "ner_tags": ["B-LOC", "I-LOC", "O", "O"]}] * 8
    _jsonl(d / "tok.jsonl", tok)
    _csv(d / "tok.csv", [{"tokens": json.dumps(r["tokens"]), "ner_tags": " ".join(r["ner_tags"])} for r in tok])
    inst = [{"instruction": "Say the color.", "input": f"The sky is {c}.", "output": c}
            for c in ["blue", "red", "green", "grey"] * 4]
    _jsonl(d / "inst.jsonl", inst)
    _csv(d / "inst.csv", inst)
    _csv(d / "text.csv", [{"text": f"the {c} fox jumps over the lazy dog"} for c in ["red", "brown", "quick"] * 5])
    _jsonl(d / "text.jsonl", [{"text": f"the {c} fox jumps"} for c in ["red", "brown"] * 5])
    s2s = [{"source": f"translate: {a}", "target": b} for a, b in [("one", "eins"), ("two", "zwei"), ("six", "sechs")] * 5]
    _jsonl(d / "s2s.jsonl", s2s)
    _csv(d / "s2s.csv", s2s)
    return root


def outputs_ok(out: Path, *metrics):
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl",
              "eval_results.json", "loss.png", "run.yaml"):
        assert (out / f).is_file(), f"{f} missing in {sorted(p.name for p in out.iterdir())}"
    res = json.loads((out / "eval_results.json").read_text())
    for m in metrics:
        assert m in res, (m, res)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and any("eval_loss" in x for x in lines)
    return res


# -- help and listing ------------------------------------------------------------------------------------------
def test_help_lists_every_option_and_methods(ws):
    h = cli("train", "--help", cwd=ws).stdout
    for flag in ("--config", "--model", "--method", "--task", "--train", "--eval", "--text-column", "--label-column",
                 "--output", "--epochs", "--max-steps", "--lr", "--batch-size", "--grad-accum", "--max-length",
                 "--warmup", "--scheduler", "--seed", "--eval-every", "--gradient-checkpointing", "--precision",
                 "--resume", "--overwrite", "--opt", "--r", "--target-modules", "--lora-alpha"):
        assert flag in h, flag
    import unipeft

    ia3 = cli("train", "--method", "ia3", "--help", cwd=ws).stdout
    assert "--feedforward-modules" in ia3 and "--lora-alpha" not in ia3
    listed = cli("methods", cwd=ws).stdout
    for name, info in unipeft.methods().items():
        assert name in listed and info.summary in listed


def test_command_help(ws, capsys):
    from unipeft.cli.main import build_parser

    parser = build_parser([])
    for cmd in ("eval", "generate", "merge", "info", "demo"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        assert "usage: unipeft " + cmd in capsys.readouterr().out


# -- each task, JSONL and CSV ----------------------------------------------------------------------------------
def test_seq_cls_string_labels_jsonl_then_eval_info_merge(ws):
    out = ws / "runs" / "cls"
    p = cli("train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "data/cls.jsonl", "--eval",
            ws / "data/cls.csv", "--output", out, *FAST, "--r", "4", "--target-modules", "query,value", cwd=ws)
    assert "trainable" in p.stdout and "24 examples" in p.stdout and "done" in p.stdout
    res = outputs_ok(out, "accuracy", "f1", "eval_loss")
    assert json.loads((out / "labels.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    meta = json.loads((out / "adapter/unipeft_task.json").read_text())
    assert meta["labels"] == ["neg", "pos"] and meta["task"] == "seq-cls"

    e = cli("eval", "--adapter", out, "--eval", ws / "data/cls.csv", "--results", ws / "runs/cls_eval.json", cwd=ws)
    again = json.loads((ws / "runs/cls_eval.json").read_text())
    assert abs(again["accuracy"] - res["accuracy"]) < 1e-9 and "accuracy" in e.stdout

    i = cli("info", out, cwd=ws).stdout
    assert "lora" in i and "seq-cls" in i and "parameters" in i and str(ws / "bert") in i

    merged = ws / "runs" / "cls_merged"
    cli("merge", "--adapter", out, "--output", merged, cwd=ws)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import unipeft

    tok = AutoTokenizer.from_pretrained(str(merged))
    batch = tok(["a good movie", "an awful movie"], return_tensors="pt", padding=True)
    plain = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    base = AutoModelForSequenceClassification.from_pretrained(str(ws / "bert"), num_labels=2).eval()
    adapted = unipeft.PeftModel.from_pretrained(base, out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, adapted(**batch).logits, atol=1e-4, rtol=0)
    assert plain.config.id2label == {0: "neg", 1: "pos"}


def test_seq_cls_pairs_csv_int_labels(ws):
    out = ws / "runs" / "pair"
    cli("train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "data/pair.csv", "--eval",
        ws / "data/pair.jsonl", "--text-column", "s1,s2", "--output", out, *FAST, cwd=ws)
    outputs_ok(out, "accuracy", "f1")
    assert json.loads((out / "adapter/unipeft_task.json").read_text())["text_columns"] == ["s1", "s2"]


@pytest.mark.parametrize("train,evalf", [("tok.jsonl", "tok.csv"), ("tok.csv", "tok.jsonl")])
def test_token_cls(ws, train, evalf):
    out = ws / "runs" / f"tok-{train}"
    cli("train", "--model", ws / "bert", "--task", "token-cls", "--train", ws / "data" / train, "--eval",
        ws / "data" / evalf, "--output", out, *FAST, cwd=ws)
    res = outputs_ok(out, "f1", "precision", "recall", "accuracy")
    assert 0 <= res["f1"] <= 1


@pytest.mark.parametrize("train,evalf,extra", [("inst.jsonl", "inst.csv", []),
                                                ("text.csv", "text.jsonl", ["--max-length", "6"])])
def test_causal_lm(ws, train, evalf, extra):
    out = ws / "runs" / f"lm-{train}"
    p = cli("train", "--model", ws / "llama", "--task", "causal-lm", "--train", ws / "data" / train, "--eval",
            ws / "data" / evalf, "--output", out, *FAST, "--max-new-tokens", "4", "--gen-samples", "4", *extra, cwd=ws)
    res = outputs_ok(out, "eval_loss", "perplexity")
    if train == "inst.jsonl":
        assert "exact_match" in res
        g = cli("generate", "--adapter", out, "--prompt", "Say the color.", "--max-new-tokens", "3", cwd=ws)
        assert g.stdout.startswith("> Say the color.")
    else:
        assert "15 examples, 15 truncated to 6 tokens" in p.stdout  # over --max-length: truncated and counted


@pytest.mark.parametrize("train,evalf", [("s2s.jsonl", "s2s.csv"), ("s2s.csv", "s2s.jsonl")])
def test_seq2seq(ws, train, evalf):
    out = ws / "runs" / f"s2s-{train}"
    cli("train", "--model", ws / "t5", "--task", "seq2seq", "--train", ws / "data" / train, "--eval", ws / "data" / evalf,
        "--output", out, *FAST, "--max-new-tokens", "4", "--gen-samples", "4", cwd=ws)
    outputs_ok(out, "eval_loss", "bleu", "rougeL", "exact_match")


def test_yaml_config_and_flags_override(ws):
    cfg = ws / "run_cfg.yaml"
    cfg.write_text(f"model: {ws / 'bert'}\ntask: seq-cls\ntrain: {ws / 'data/cls.jsonl'}\nlr: 5e-3\nmax_steps: 2\n"
                   f"batch_size: 4\nmethod_options:\n  r: 2\n")
    out = ws / "runs" / "yaml"
    cli("train", "--config", cfg, "--output", out, "--max-steps", "1", cwd=ws)
    import yaml

    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["lr"] == 5e-3 and run["max_steps"] == 1 and run["method_options"]["r"] == 2
    assert (out / "adapter/adapter_model.safetensors").is_file()


# -- resume ----------------------------------------------------------------------------------------------------
def _last_loss(out: Path) -> tuple[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in lines if "loss" in x and "eval_loss" not in x][-1]
    return last["step"], last["loss"]


def test_resume_after_interrupt_reproduces_the_run(ws):
    # dropout on (BERT's hidden dropout + LoRA dropout), several epochs, gradient accumulation: RNG, data
    # position, optimizer and scheduler must all come back exactly.
    common = ["train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "data/cls.jsonl", "--eval",
              ws / "data/cls.jsonl", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "8", "--log-every", "1",
              "--eval-every", "3", "--lora-dropout", "0.1", "--scheduler", "cosine"]
    full, part = ws / "runs/full", ws / "runs/part"
    cli(*common, "--output", full, cwd=ws)
    p = cli(*common, "--output", part, cwd=ws, ok=False, env={"UNIPEFT_STOP_AT_STEP": "5"})
    fails(p, "interrupted at step 5", "--resume", code=130)
    assert json.loads((part / "checkpoint/state.json").read_text())["step"] == 5
    cli("train", "--output", part, "--resume", cwd=ws)
    s_full, l_full = _last_loss(full)
    s_part, l_part = _last_loss(part)
    assert s_full == s_part == 8
    assert abs(l_full - l_part) < 1e-6, (l_full, l_part)
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" not in x]
    assert steps == list(range(1, 9))  # no step logged twice after the resume


def test_ctrl_c_saves_a_resumable_checkpoint(ws):
    out = ws / "runs" / "sigint"
    proc = subprocess.Popen([sys.executable, "-m", "unipeft.cli", "train", "--model", str(ws / "bert"), "--task",
                             "seq-cls", "--train", str(ws / "data/cls.jsonl"), "--batch-size", "2", "--max-steps",
                             "100000", "--log-every", "1", "--output", str(out)], cwd=ws, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    fails(p, "interrupted at step", "resumable checkpoint", code=130)
    step = json.loads((out / "checkpoint/state.json").read_text())["step"]
    assert step >= 1
    cli("train", "--output", out, "--resume", "--max-steps", step + 2, cwd=ws)
    assert _last_loss(out)[0] == step + 2


# -- bad input -------------------------------------------------------------------------------------------------
def test_missing_file_in_a_subprocess(ws):
    p = cli("train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "data/missing.jsonl", cwd=ws, ok=False)
    fails(p, "file not found", "missing.jsonl")


def test_bad_inputs_give_a_message_and_no_traceback(ws, capsys):
    def cli(*args, cwd, ok):  # in this process: a traceback would fail the test as an exception
        return cli_in_process(*args, cwd=cwd, capsys=capsys)

    d, bert = ws / "data", ws / "bert"
    base = ["train", "--model", bert, "--task", "seq-cls", *FAST]
    out = ws / "runs" / "bad"

    fails(cli(*base, "--train", d / "missing.jsonl", "--output", out, cwd=ws, ok=False), "file not found",
          "missing.jsonl")
    p = cli(*base, "--train", d / "cls.jsonl", "--text-column", "sentence", "--output", out, cwd=ws, ok=False)
    fails(p, "'sentence' not found", "columns found", "'text'", "'label'")
    fails(cli(*base, "--train", d / "cls.jsonl", "--label-column", "stars", "--output", out, cwd=ws, ok=False),
          "'stars' not found", "columns found")
    (d / "empty.jsonl").write_text("")
    fails(cli(*base, "--train", d / "empty.jsonl", "--output", out, cwd=ws, ok=False), "no rows")
    (d / "empty.csv").write_text("text,label\n")
    fails(cli(*base, "--train", d / "empty.csv", "--output", out, cwd=ws, ok=False), "no rows")
    _jsonl(d / "badlabel.jsonl", [{"text": "ok", "label": 1}, {"text": "hm", "label": 0.5}])
    fails(cli(*base, "--train", d / "badlabel.jsonl", "--output", out, cwd=ws, ok=False), "row 2", "0.5")
    _jsonl(d / "listlabel.jsonl", [{"text": "ok", "label": [1, 2]}])
    fails(cli(*base, "--train", d / "listlabel.jsonl", "--output", out, cwd=ws, ok=False), "does not parse")
    _jsonl(d / "nolabel.jsonl", [{"text": "ok", "label": 1}, {"text": "hm", "label": None}])
    fails(cli(*base, "--train", d / "nolabel.jsonl", "--output", out, cwd=ws, ok=False), "row 2", "label is empty")
    _jsonl(d / "unseen.jsonl", [{"text": "ok", "label": "meh"}])
    fails(cli(*base, "--train", d / "cls.jsonl", "--eval", d / "unseen.jsonl", "--output", out, cwd=ws, ok=False),
          "'meh' was not seen in training")
    _jsonl(d / "badtags.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O"]}])
    fails(cli("train", "--model", bert, "--task", "token-cls", "--train", d / "badtags.jsonl", "--output", out, cwd=ws,
              ok=False), "2 tokens but 1 tags")
    (d / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    fails(cli(*base, "--train", d / "broken.jsonl", "--output", out, cwd=ws, ok=False), "line 2", "not valid JSON")
    fails(cli(*base, "--train", d / "cls.jsonl", "--opt", "rank=4", "--output", out, cwd=ws, ok=False),
          "has no option 'rank'")
    fails(cli(*base, "--train", d / "cls.jsonl", "--method", "nope", "--output", out, cwd=ws, ok=False),
          "unknown method 'nope'")
    fails(cli(*base, "--train", d / "cls.jsonl", "--config", ws / "none.yaml", cwd=ws, ok=False), "config file not found")
    fails(cli("train", "--model", ws / "nothere", "--train", d / "cls.jsonl", cwd=ws, ok=False), "folder not found")
    fails(cli("eval", "--adapter", ws / "runs/nothere", "--eval", d / "cls.jsonl", cwd=ws, ok=False),
          "adapter folder not found")
    assert not out.exists()  # a failed setup makes no folder


def test_output_folder_holding_a_run_is_refused(ws, capsys):
    out = ws / "runs" / "taken"
    args = ["train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "data/cls.jsonl", "--batch-size", "4",
            "--max-steps", "1", "--output", out]
    cli(*args, cwd=ws)
    before = (out / "adapter/adapter_model.safetensors").read_bytes()
    fails(cli(*args, cwd=ws, ok=False), "already holds a run", "--overwrite", "--resume")
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == before  # nothing lost
    p = cli_in_process("train", "--output", ws / "runs/fresh", "--resume", "--train", ws / "data/cls.jsonl", cwd=ws,
                       capsys=capsys)
    fails(p, "nothing to resume")
    p = cli_in_process(*args, "--overwrite", "--text-column", "sentence", cwd=ws, capsys=capsys)
    fails(p, "'sentence' not found")  # --overwrite clears the old run only once the new one is set up
    assert (out / "adapter/adapter_model.safetensors").read_bytes() == before
    assert cli_in_process(*args, "--overwrite", "--seed", "7", cwd=ws, capsys=capsys).returncode == 0
    assert (out / "adapter/adapter_model.safetensors").read_bytes() != before


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(ws):
    out = ws / "runs" / "nan"
    p = cli("train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "data/cls.jsonl", "--batch-size", "4",
            "--max-steps", "50", "--lr", "1e30", "--warmup", "0", "--max-grad-norm", "0", "--save-every", "1",
            "--output", out, cwd=ws, ok=False)
    fails(p, "became", "at step", "last good checkpoint is step", "--lr")
    assert p.returncode == 3
    state = json.loads((out / "checkpoint/state.json").read_text())
    assert f"step {state['step']} in" in p.stderr


def test_seq_cls_trains_on_a_quantized_base_built_layer_by_layer(ws, capsys):
    pytest.importorskip("bitsandbytes")
    out = ws / "runs" / "nf4_cls"
    p = cli_in_process("train", "--model", ws / "bert", "--task", "seq-cls", "--quantize", "nf4", "--train",
                       ws / "data/cls.jsonl", "--batch-size", "4", "--max-steps", "2", "--output", out, cwd=ws,
                       capsys=capsys)
    assert p.returncode == 0, p.stderr
    assert "nf4 base (built layer by layer)" in p.stdout
    from safetensors import safe_open

    with safe_open(str(out / "adapter/adapter_model.safetensors"), "pt") as f:
        assert any("classifier" in k for k in f.keys()) and any("lora_A" in k for k in f.keys())


def test_causal_lm_trains_on_an_fp8_base(ws, capsys):
    out = ws / "runs" / "fp8_lm"
    p = cli_in_process("train", "--model", ws / "llama", "--task", "causal-lm", "--train", ws / "data/text.csv",
                       "--quantize", "fp8", "--batch-size", "4", "--max-steps", "3", "--log-every", "1",
                       "--max-length", "8", "--output", out, cwd=ws, capsys=capsys)
    assert p.returncode == 0, p.stderr
    assert "fp8 base (built layer by layer)" in p.stdout
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_streamed_layers_train_like_resident_ones(ws, capsys):
    pytest.importorskip("bitsandbytes")
    args = ["train", "--model", ws / "llama", "--task", "causal-lm", "--train", ws / "data/text.csv", "--quantize",
            "nf4", "--batch-size", "4", "--max-steps", "3", "--log-every", "1", "--max-length", "8"]
    fails(cli_in_process(*args, "--stream-layers", "--output", ws / "runs/stream_nogc", cwd=ws, capsys=capsys),
          "--stream-layers", "--gradient-checkpointing")
    assert not (ws / "runs/stream_nogc").exists()
    losses = {}
    for name, extra in (("resident", []), ("streamed", ["--stream-layers"])):
        out = ws / "runs" / f"nf4_{name}"
        p = cli_in_process(*args, "--gradient-checkpointing", *extra, "--output", out, cwd=ws, capsys=capsys)
        assert p.returncode == 0, p.stderr
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [x["loss"] for x in lines if "loss" in x and "eval_loss" not in x]
    assert "streamed from host memory" in p.stdout
    assert len(losses["streamed"]) == 3 and losses["streamed"] == pytest.approx(losses["resident"], rel=1e-5)


def test_merge_refuses_a_method_that_cannot_merge(ws, capsys):
    out = ws / "runs" / "houlsby"
    p = cli_in_process("train", "--model", ws / "bert", "--task", "seq-cls", "--method", "houlsby", "--train",
                       ws / "data/cls.jsonl", "--batch-size", "4", "--max-steps", "1", "--output", out, cwd=ws,
                       capsys=capsys)
    assert p.returncode == 0, p.stderr
    p = cli_in_process("merge", "--adapter", out, "--output", ws / "runs/houlsby_merged", cwd=ws, capsys=capsys)
    fails(p, "cannot be merged")


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "unipeft"
    if not exe.exists():
        pytest.skip("package not installed with its console script")
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=ENV)
    assert p.returncode == 0 and "unipeft" in p.stdout
