"""Several processes (CPU, gloo, `torchrun --nproc_per_node 2`) give what one process gives with the same global
batch and seed: through the command line and through the Python API (Accelerate + get_peft_model), for LoRA,
Houlsby, prefix tuning and prompt tuning (dropout 0, 1e-5 relative); saved adapters reload on one process with
the same logits; a run stopped on 2 processes resumes on 1, and one stopped on 1 resumes on 2, to the weights of
an uninterrupted run; evaluation covers the eval set exactly once; every registered method trains under DDP with
find_unused_parameters=False. Three torchrun launches in all (start-up dominates); references run in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ROOT / "tests" / "programs_ddp"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def torchrun(*args, env=None, ok=True, cwd=None):
    """`torchrun --standalone --nproc_per_node 2 ...` (a free port, so parallel test runs do not collide)."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *map(str, args)], capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=cwd,
                       timeout=600)
    if ok and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def accelerate_launch(tmp: Path, *args, ok=True):
    """`accelerate launch --config_file CFG ...` with a user's config for 2 processes (a multi-GPU one: on a CPU
    machine unipeft's Accelerator runs it on CPUs with gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "accelerate.yaml"
    cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"
                   f"num_machines: 1\nmachine_rank: 0\ngpu_ids: all\nmain_process_port: {port}\n"
                   "mixed_precision: 'no'\nuse_cpu: false\n")
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg),
                        *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600)
    if ok and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


def close(a: dict, b: dict, rtol=1e-5):
    assert sorted(a) == sorted(b), (sorted(a)[:4], sorted(b)[:4])
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-12)
        err = (a[k].float() - b[k].float()).abs().max() / scale
        assert err <= rtol, f"{k}: relative difference {err:.3g}"


# -- command line --------------------------------------------------------------------------------------------
def write_bert_workspace(root: Path, n_eval: int) -> Path:
    """A tiny BERT classifier (MiniLM's tokenizer) and 20 sentiment rows under root; the first n_eval rows are the
    eval set (an odd count splits unevenly over 2 processes)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from unipeft.cli.embedded import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    pos, neg = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "sad"]
    rows = [{"text": f"a {(pos if i % 2 else neg)[i % 4]} {'movie' if i % 3 else 'film, truly'}",
             "label": "pos" if i % 2 else "neg"} for i in range(20)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_eval]))
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return write_bert_workspace(tmp_path_factory.mktemp("ddp"), 7)  # odd: 4 + 3 rows


METHOD_FLAGS = {"lora": ["--lora-dropout", "0"], "houlsby": [], "prefix_tuning": ["--num-virtual-tokens", "4"],
                "prompt_tuning": ["--num-virtual-tokens", "4"]}


def train_args(ws, method, out, *extra):
    # 20 rows, global batch 8: steps of 8, 8, 4 rows (the last leaves process 1 a zero-weight micro-batch), then
    # the next epoch; --eval-every 2 evaluates on both sides of a stop at step 3
    return ["train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "train.jsonl", "--eval",
            ws / "eval.jsonl", "--method", method, *METHOD_FLAGS[method], "--batch-size", "4", "--max-steps", "5",
            "--log-every", "1", "--eval-every", "2", "--lr", "0.01", "--output", out, *extra]


def in_process(*args, env=None) -> int:
    """One process: the same entry point in this process (no start-up cost)."""
    from unipeft.cli.main import main

    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return main([str(a) for a in args])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def final_weights(out: Path) -> dict:
    return load_file(out / "checkpoint" / "trainable.safetensors")


def records(out: Path):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "eval_loss" not in x], [x for x in lines if "eval_loss" in x]


def test_cli_on_two_processes_equals_one_and_resumes_across_world_sizes(ws):
    runs = ws / "runs"
    # a real `torchrun -m unipeft.cli train`, stopped after step 3 (as by Ctrl-C): exit 130 and a checkpoint
    p = torchrun("-m", "unipeft.cli", *train_args(ws, "lora", runs / "lora2"), ok=False,
                 env={"UNIPEFT_STOP_AT_STEP": "3"})
    assert p.returncode != 0 and "interrupted at step 3" in p.stderr, p.stderr[-3000:]
    assert p.stdout.count("── unipeft train") == 1, p.stdout  # one banner: the main process speaks
    assert "cpu:0 x2 (DDP)" in p.stdout and "global batch 8 (batch 4 x 2 processes x accumulation 1)" in p.stdout
    # one process, stopped at step 3 too, to be resumed on two
    assert in_process(*train_args(ws, "lora", runs / "lora1", "--grad-accum", "2"),
                      env={"UNIPEFT_STOP_AT_STEP": "3"}) == 130
    # on two processes, launched by `accelerate launch` with a config: the other methods, and the resume of the
    # one-process run
    accelerate_launch(ws, PROGRAMS / "cli_runs.py", json.dumps(
        # houlsby with gradient checkpointing too: DDP's "marked ready twice" must not happen (recomputation is
        # exact with dropout 0, so the reference needs none)
        [[0, *map(str, train_args(ws, "houlsby", runs / "houlsby2", "--gradient-checkpointing"))]]
        + [[0, *map(str, train_args(ws, m, runs / f"{m}2"))] for m in ("prefix_tuning", "prompt_tuning")]
        + [[0, "train", "--output", str(runs / "lora1"), "--resume"]]))
    # the two-process lora run resumed on one process
    assert in_process("train", "--output", runs / "lora2", "--resume") == 0
    # references: one process, the same global batch (4 x accumulation 2), uninterrupted
    for m in METHOD_FLAGS:
        assert in_process(*train_args(ws, m, runs / f"{m}-ref", "--grad-accum", "2")) == 0
        ref = final_weights(runs / f"{m}-ref")
        for out in [runs / f"{m}2"] + ([runs / "lora1"] if m == "lora" else []):
            close(final_weights(out), ref)
            train, evals = records(out)
            ref_train, ref_evals = records(runs / f"{m}-ref")
            assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # each step logged once, by one process
            assert [r["step"] for r in evals] == [2, 4, 5]
            for a, b in zip(train + evals, ref_train + ref_evals):
                for k in ("loss", "eval_loss", "accuracy"):  # eval over the 7 rows exactly once (no padding rows)
                    if k in b:
                        assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), (out.name, a, b)
        # the adapter written on two processes loads on one with the reference's logits
        if m != "lora":
            _same_logits(ws, runs / f"{m}2" / "adapter", runs / f"{m}-ref" / "adapter")
    _same_logits(ws, runs / "lora2" / "checkpoint" / "adapter", runs / "lora1" / "checkpoint" / "adapter")


def _same_logits(ws, a: Path, b: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from unipeft import PeftModel

    tok = AutoTokenizer.from_pretrained(str(ws / "bert"))
    batch = tok(["a good movie", "a sad film, truly"], padding=True, return_tensors="pt")
    logits = []
    for folder in (a, b):
        base = AutoModelForSequenceClassification.from_pretrained(str(ws / "bert"), num_labels=2)
        peft = PeftModel.from_pretrained(base, str(folder)).eval()
        with torch.no_grad():
            logits.append(peft(**batch).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)


# -- Python API ----------------------------------------------------------------------------------------------
def test_python_api_on_two_processes_equals_one_and_every_method_runs_under_ddp(tmp_path):
    sys.path.insert(0, str(PROGRAMS))
    try:
        import train_api
    finally:
        sys.path.remove(str(PROGRAMS))
    p = torchrun(PROGRAMS / "train_api.py", tmp_path, "--all")
    assert "ok the control: an unused parameter is an error" in p.stdout, p.stdout[-2000:]
    for method in train_api.EVERY:  # 2 steps each with find_unused_parameters=False
        assert f"ok {method}\n" in p.stdout, p.stdout[-2000:]
    from accelerate import Accelerator

    from unipeft import PeftModel

    acc = Accelerator(cpu=True)  # one process
    ids = train_api.data(1)[0]
    for name, (method, options) in train_api.CASES.items():
        ref = train_api.train(acc, method, options).eval()
        init = train_api.peft_model(method, options).adapter_state_dict()
        moved = max(float((v - init[k]).abs().max()) for k, v in ref.adapter_state_dict().items())
        assert moved > 1e-3, (name, moved)  # training moved the adapter: the comparison below is not vacuous
        saved = load_file(tmp_path / name / "adapter_model.safetensors")
        close(saved, {k: v.detach() for k, v in ref.adapter_state_dict().items()})
        loaded = PeftModel.from_pretrained(train_api.base_model(), str(tmp_path / name)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_engines_that_cannot_run_here_are_refused(ws, capsys):
    # on CPU, FSDP2 and DeepSpeed run under torchrun with --distributed (tests/test_sharded_cli.py); an Accelerate
    # config asking for them would silently become DDP (Accelerate sets them up only on GPUs), DeepSpeed without a
    # launcher has no ranks, and a --distributed flag contradicting the launch's Accelerate config is refused too
    base = ["train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "train.jsonl", "--output",
            ws / "runs" / "refused"]
    for engine in ("zero2", "zero3"):
        assert in_process(*base, "--distributed", engine) == 2
        err = capsys.readouterr().err
        assert "runs DeepSpeed under a launcher" in err and "fix: launch with torchrun" in err, err
    for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        assert in_process(*base, env={flag: "true"}) == 2
        err = capsys.readouterr().err
        assert "needs GPUs" in err and "--distributed fsdp|zero2|zero3" in err, err
    assert in_process(*base, "--distributed", "ddp", env={"ACCELERATE_USE_FSDP": "true"}) == 2
    err = capsys.readouterr().err
    assert "contradicts the Accelerate config" in err, err
    assert not (ws / "runs" / "refused").exists()
