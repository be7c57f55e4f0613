"""The CLI's GPU fast path, on CPU: the frozen base in the compute dtype (adapters fp32), no host reads of device
values inside a training step (only at logging / evaluation / checkpoint boundaries), and the --liger decision."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from unipeft.cli.errors import CliError
from unipeft.cli.fast_path import base_dtype, liger_wanted

HERE = Path(__file__).resolve().parent


def write_llama_workspace(root: Path) -> Path:
    """A tiny Llama with the embedded tokenizer, and a few text rows (text.jsonl): a causal-LM CLI workspace."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from unipeft.cli.embedded import embedded_path

    tok = AutoTokenizer.from_pretrained(str(embedded_path()))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    (root / "text.jsonl").write_text("".join(json.dumps({"text": f"the {c} fox jumps over {d}"}) + "\n"
                                             for c in ("red", "brown", "quick") for d in ("it", "the dog", "a log")))
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = write_llama_workspace(tmp_path_factory.mktemp("fast"))
    (root / "cls.jsonl").write_text("".join(json.dumps({"text": f"a {w} movie", "label": i % 2}) + "\n"
                                            for i, w in enumerate(["good", "bad", "fine", "sad"] * 3)))
    return root


def _train(ws, capsys, out, *extra, batch_size: int = 3):
    from unipeft.cli import main

    old = os.getcwd()
    os.chdir(ws)
    try:
        code = main(["train", "--model", str(ws / "llama"), "--task", "causal-lm", "--train", str(ws / "text.jsonl"),
                     "--batch-size", str(batch_size), "--max-length", "16", "--output", str(ws / out), "--overwrite",
                     *extra])
    finally:
        os.chdir(old)
    return code, capsys.readouterr()


# Runs with --precision bf16 go to a subprocess: Accelerate keeps one precision per process.
_DTYPES_PROG = """
import json, sys
from unipeft.cli import loop, main
orig = loop.Trainer.run
seen = {}
def run(self, bar):
    m = self.acc.unwrap_model(self.model)
    seen["frozen"] = sorted({str(p.dtype) for p in m.parameters() if not p.requires_grad})
    seen["trainable"] = sorted({str(p.dtype) for p in m.parameters() if p.requires_grad})
    return orig(self, bar)
loop.Trainer.run = run
code = main(sys.argv[1:])
print("DTYPES " + json.dumps(seen))
sys.exit(code)
"""


def _train_dtypes(ws, model, out, *extra):
    """(exit code, stdout, stderr, {frozen: [dtypes], trainable: [dtypes]}) of a run in its own process."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    task, data = ("seq-cls", "cls.jsonl") if "seq-cls" in extra else ("causal-lm", "text.jsonl")
    extra = [x for x in extra if x != "seq-cls"]
    p = subprocess.run([sys.executable, "-c", _DTYPES_PROG, "train", "--model", str(ws / model), "--task",
                        task, "--train", str(ws / data), "--batch-size", "3", "--max-length", "16",
                        "--output", str(ws / out), "--overwrite", *map(str, extra)], cwd=ws, env=env,
                       capture_output=True, text=True, timeout=300)
    line = next((x for x in p.stdout.splitlines() if x.startswith("DTYPES ")), "DTYPES {}")
    return p.returncode, p.stdout, p.stderr, json.loads(line[7:])


# -- 1. the base in the compute dtype -------------------------------------------------------------------------
def test_base_dtype_choice():
    assert base_dtype("auto", "bf16", "cuda", sharded=False) == "bfloat16"
    assert base_dtype("auto", "fp16", "cuda", sharded=False) == "float16"
    assert base_dtype("auto", "bf16", "cpu", sharded=False) == "float32"  # CPU: nothing changes by default
    assert base_dtype("auto", "bf16", "cuda", sharded=True) == "float32"  # FSDP2 / DeepSpeed keep theirs
    assert base_dtype("auto", "no", "cuda", sharded=False) == "float32"
    assert base_dtype("fp32", "bf16", "cuda", sharded=False) == "float32"
    assert base_dtype("compute", "bf16", "cpu", sharded=False) == "bfloat16"
    with pytest.raises(CliError, match="needs bf16 or fp16 training"):
        base_dtype("compute", "no", "cuda", sharded=False)
    with pytest.raises(CliError, match="sharded engine"):
        base_dtype("compute", "bf16", "cuda", sharded=True)


def test_bf16_run_keeps_the_frozen_base_bf16_and_adapters_fp32(ws):
    code, out, err, seen = _train_dtypes(ws, "llama", "bf16", "--precision", "bf16", "--base-dtype", "compute",
                                         "--max-steps", "2", "--eval", ws / "text.jsonl", "--gen-samples", "2",
                                         "--max-new-tokens", "3")
    assert code == 0, err[-3000:]
    assert seen == {"frozen": ["torch.bfloat16"], "trainable": ["torch.float32"]}, seen
    assert "bfloat16 base" in out
    from safetensors.torch import load_file

    saved = load_file(str(ws / "bf16/adapter/adapter_model.safetensors"))
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    loss = [json.loads(x)["loss"] for x in (ws / "bf16/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert loss and all(torch.isfinite(torch.tensor(loss)))
    assert "eval_loss" in json.loads((ws / "bf16/eval_results.json").read_text())
    # a task head (trained as a copy) on a bf16 base, evaluated
    code, out, err, seen = _train_dtypes(ws, "llama", "bf16_cls", "seq-cls", "--precision", "bf16", "--base-dtype",
                                         "compute", "--max-steps", "2", "--eval", ws / "cls.jsonl")
    assert code == 0, err[-3000:]
    assert seen == {"frozen": ["torch.bfloat16"], "trainable": ["torch.float32"]}, seen
    assert "accuracy" in json.loads((ws / "bf16_cls/eval_results.json").read_text())
    # the default on CPU: an fp32 base, as before
    code, out, err, seen = _train_dtypes(ws, "llama", "bf16_auto", "--precision", "bf16", "--max-steps", "1")
    assert code == 0, err[-3000:]
    assert seen == {"frozen": ["torch.float32"], "trainable": ["torch.float32"]}, seen
    assert "liger off (not on CUDA)" in out


def test_trained_half_precision_base_tensors_become_fp32(ws):
    # LoRA with bias="all" trains the base's biases: on a bf16 base they are upcast to fp32 masters
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(ws / "llama")
    cfg.attention_bias = True
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(ws / "llama_bias")
    for f in (ws / "llama").glob("*token*"):
        (ws / "llama_bias" / f.name).write_bytes(f.read_bytes())
    code, out, err, seen = _train_dtypes(ws, "llama_bias", "bias", "--precision", "bf16", "--base-dtype", "compute",
                                         "--max-steps", "1", "--opt", "bias=all")
    assert code == 0, err[-3000:]
    assert seen == {"frozen": ["torch.bfloat16"], "trainable": ["torch.float32"]}, seen


def test_base_dtype_compute_refused_without_half_precision(ws, capsys):
    code, io = _train(ws, capsys, "bad", "--precision", "fp32", "--base-dtype", "compute", "--max-steps", "1")
    assert code != 0 and "--base-dtype compute needs bf16 or fp16" in io.err and "Traceback" not in io.err


# -- 2. host reads per step -----------------------------------------------------------------------------------
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


def test_a_training_step_reads_nothing_back_from_the_device(ws, capsys, monkeypatch):
    """Host reads of tensor values made by unipeft's code (CLI and library: the step's forward included) while a
    step runs, and the loop's reads per step: only at logging (every 3 steps) and checkpoint (every 4) boundaries
    and at the end. On CUDA each such read waits for the GPU; on CPU we count them where they would happen."""
    import sys

    from unipeft.cli import loop
    from unipeft.cli.step_stats import StepStats

    from unipeft.training import losses

    monkeypatch.setattr(losses, "reads_are_free", lambda device: False)  # the chunked loss as on an accelerator
    pkg = str(Path(loop.__file__).resolve().parents[1])  # .../unipeft
    state = {"in_step": False, "step": 0}
    in_step, reads_at = [], []

    for name in READS:
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, __orig=orig, __name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(pkg) and state["in_step"]:
                in_step.append((__name, caller, sys._getframe(1).f_lineno))
            return __orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    orig_step, orig_read = loop.Trainer.train_step, StepStats.read

    def train_step(self, micro):
        state["in_step"], state["step"] = True, self.state.step + 1
        try:
            return orig_step(self, micro)
        finally:
            state["in_step"] = False

    def read(self):
        reads_at.append(state["step"])
        return orig_read(self)

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    monkeypatch.setattr(StepStats, "read", read)
    code, io = _train(ws, capsys, "syncs", "--max-steps", "9", "--log-every", "3", "--save-every", "4",
                      "--grad-accum", "2", "--batch-size", "2", "--lora-dropout", "0.1")
    assert code == 0, io.err
    assert in_step == [], in_step[:5]
    assert reads_at == [3, 4, 6, 8, 9, 9], reads_at  # boundaries; step 9 is logged, then the end's read
    lines = [json.loads(x) for x in (ws / "syncs/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [3, 6, 9]


def test_logged_loss_is_the_mean_of_the_window_s_step_losses(ws, capsys, monkeypatch):
    """The device-side window gives what the per-step host floats gave: the mean of the steps' losses."""
    from unipeft.cli import loop

    losses = []
    orig_step = loop.Trainer.train_step

    def train_step(self, micro):
        loss, ntok = orig_step(self, micro)
        losses.append(float(loss))
        return loss, ntok

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    code, io = _train(ws, capsys, "window", "--max-steps", "5", "--log-every", "2", "--grad-accum", "2",
                      "--batch-size", "2")
    assert code == 0, io.err
    logged = [json.loads(x) for x in (ws / "window/metrics.jsonl").read_text().splitlines()]
    logged = [x["loss"] for x in logged if "loss" in x]
    want = [sum(losses[0:2]) / 2, sum(losses[2:4]) / 2, losses[4]]
    assert logged == pytest.approx(want, rel=1e-12, abs=0)


def test_nonfinite_step_between_boundaries_stops_at_the_next_one_without_writing(ws, capsys, monkeypatch):
    """A NaN loss at step 2 found at the step-3 log boundary: exit 3 naming step 2, the checkpoint of step 1 kept."""
    from unipeft.cli import loop

    orig_step = loop.Trainer.train_step

    def train_step(self, micro):
        if self.state.step + 1 == 2:
            lora = next(p for n, p in self.named if "lora_B" in n)
            with torch.no_grad():
                lora.fill_(float("nan"))
        return orig_step(self, micro)

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    code, io = _train(ws, capsys, "nan", "--max-steps", "6", "--log-every", "3", "--save-every", "1",
                      "--max-grad-norm", "0")
    # save-every 1 is a boundary each step: the NaN is seen at step 2 itself
    assert code == 3 and "became nan at step 2" in io.err and "last good checkpoint is step 1" in io.err, io.err
    assert json.loads((ws / "nan/checkpoint/state.json").read_text())["step"] == 1
    code, io = _train(ws, capsys, "nan2", "--max-steps", "6", "--log-every", "3", "--save-every", "100",
                      "--max-grad-norm", "1")
    assert code == 3 and "became nan at step 2" in io.err and "no checkpoint had been saved" in io.err, io.err
    assert not (ws / "nan2/checkpoint").exists() and not (ws / "nan2/adapter").exists()


# -- 3. liger decision ----------------------------------------------------------------------------------------
def test_liger_decision():
    assert liger_wanted("auto", "cuda", available=True) == (True, "")
    assert liger_wanted("auto", "cuda", available=False)[0] is False
    assert liger_wanted("auto", "cpu", available=True)[0] is False
    assert liger_wanted("off", "cuda", available=True)[0] is False
    with pytest.raises(CliError, match="needs a CUDA device"):
        liger_wanted("on", "cpu", available=True)
    with pytest.raises(CliError, match="not installed"):
        liger_wanted("on", "cuda", available=False)
