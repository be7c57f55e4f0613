"""`torchrun --nproc_per_node 2 -m unipeft.cli train --distributed fsdp|zero3` on CPU (gloo): torch's FSDP2
(`fully_shard`, where Accelerate sets FSDP up only for GPUs) and DeepSpeed ZeRO-3 on its CPU accelerator give the
adapter one process gives with the same global batch (1e-5 relative), evaluate a 5-row eval set (uneven over 2
processes: sharded forwards are collectives, so every process runs the same number of batches) with every row
counted once, save adapters that reload with the same logits, and FSDP2, ZeRO-3 and ZeRO-2 checkpoints resume on
1 process (a 1-process one under ZeRO-3 on 2; ZeRO-2 refuses it). A Ctrl-C sent to one process of a 2-process
FSDP2 run stops every process after the same step with a resumable checkpoint, and resuming reaches the weights of
an uninterrupted run. One launch per engine (start-up dominates)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_distributed import ENV, PROGRAMS, close, final_weights, in_process, records, torchrun, write_bert_workspace

METHOD_FLAGS = {"lora": ["--lora-dropout", "0"], "prefix_tuning": ["--num-virtual-tokens", "4"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process references with one thread, as the launched processes run (OMP_NUM_THREADS=1): Adam on LoRA-A
    gradients near zero turns another summation order into ~5e-4 relative on the causal LM."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = write_bert_workspace(tmp_path_factory.mktemp("sharded_cli"), 5)  # 3 + 2 rows: 2 and 1 batches
    # a causal LM: chunked training loss (no logits in the output FSDP2's hooks walk) and generation in the eval
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from unipeft.cli.embedded import embedded_path

    lm_tok = AutoTokenizer.from_pretrained(str(embedded_path()))
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(lm_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=lm_tok.bos_token_id,
        eos_token_id=lm_tok.eos_token_id, tie_word_embeddings=True)).save_pretrained(root / "llama")
    lm_tok.save_pretrained(root / "llama")
    inst = [{"instruction": "Say the color.", "input": f"The sky is {c}.", "output": c}
            for c in ["blue", "red", "green", "grey"] * 4]
    (root / "inst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inst))
    (root / "inst_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inst[:5]))
    return root


def lm_args(ws, out, *extra):
    return ["train", "--model", ws / "llama", "--task", "causal-lm", "--train", ws / "inst.jsonl", "--eval",
            ws / "inst_eval.jsonl", "--method", "lora", "--lora-dropout", "0", "--batch-size", "2", "--max-steps", "3",
            "--lr", "0.01", "--gen-samples", "5", "--max-new-tokens", "4", "--output", out, *extra]


def train_args(ws, method, out, *extra):
    # global batch 4 (2 x 2 processes, or 2 x accumulation 2 on one): 20 rows, 5 steps; eval at steps 2, 4, 5
    return ["train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "train.jsonl", "--eval",
            ws / "eval.jsonl", "--method", method, *METHOD_FLAGS[method], "--batch-size", "2", "--max-steps", "5",
            "--log-every", "1", "--eval-every", "2", "--lr", "0.01", "--output", out, *extra]


def launch(ws, runs: list):
    return torchrun(PROGRAMS / "cli_runs.py", json.dumps([[code, *map(str, argv)] if not isinstance(argv[0], dict) else
                                                  [code, argv[0], *map(str, argv[1:])] for code, *argv in runs]))


@pytest.fixture(scope="module")
def refs(ws):
    """One process, the same global batch (2 x accumulation 2), uninterrupted; and the same stopped after step 1
    (every tensor moves after it, so equal final tensors mean equal training, not untouched ones)."""
    out = {}
    for m in METHOD_FLAGS:
        out[m] = ws / "runs" / f"{m}-ref"
        assert in_process(*train_args(ws, m, out[m], "--grad-accum", "2")) == 0
        assert in_process(*train_args(ws, m, ws / "runs" / f"{m}-step1", "--grad-accum", "2"),
                          env={"UNIPEFT_STOP_AT_STEP": "1"}) == 130
        early = final_weights(ws / "runs" / f"{m}-step1")
        still = [k for k, v in final_weights(out[m]).items() if torch.equal(v, early[k])]
        assert not still, (m, still[:3])
    return out


def assert_same_run(run: Path, ref: Path):
    close(final_weights(run), final_weights(ref))
    train, evals = records(run)
    ref_train, ref_evals = records(ref)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # each step logged once, by the main process
    assert [r["step"] for r in evals] == [2, 4, 5]
    for a, b in zip(train + evals, ref_train + ref_evals):
        for k in ("loss", "eval_loss", "accuracy"):  # the 5 eval rows each counted once: the same mean loss
            if k in b:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), (run.name, a, b)
    got, want = (json.loads((r / "eval_results.json").read_text()) for r in (run, ref))
    assert abs(got["eval_loss"] - want["eval_loss"]) <= 1e-5 and got["accuracy"] == want["accuracy"]


def same_logits(ws, a: Path, b: Path):
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


def test_fsdp_cli_equals_one_process_and_resumes_on_one(ws, refs):
    runs = ws / "runs"
    p = launch(ws, [[0, *train_args(ws, "lora", runs / "lora-fsdp", "--distributed", "fsdp")],
                [0, *train_args(ws, "prefix_tuning", runs / "prefix-fsdp", "--distributed", "fsdp")],
                [130, {"UNIPEFT_STOP_AT_STEP": "3"},
                 *train_args(ws, "lora", runs / "lora-fsdp-stop", "--distributed", "fsdp")],
                [0, *lm_args(ws, runs / "lm-fsdp", "--distributed", "fsdp")]])
    assert p.stdout.count("cpu:0 x2 (FSDP2)") == 4, p.stdout[-3000:]  # one banner per run: the main process speaks
    for m, run in (("lora", runs / "lora-fsdp"), ("prefix_tuning", runs / "prefix-fsdp")):
        assert_same_run(run, refs[m])
        same_logits(ws, run / "adapter", refs[m] / "adapter")  # the best-eval adapter, gathered and reloaded
    # the 2-process FSDP2 checkpoint (step 3) resumes on one process (run.yaml keeps --distributed fsdp)
    assert json.loads((runs / "lora-fsdp-stop" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert in_process("train", "--output", runs / "lora-fsdp-stop", "--resume") == 0
    close(final_weights(runs / "lora-fsdp-stop"), final_weights(refs["lora"]))
    # causal LM: the same weights, eval loss and greedy generations (5 prompts: 2 batches on rank 0, 1 on rank 1)
    assert in_process(*lm_args(ws, runs / "lm-ref", "--grad-accum", "2")) == 0
    close(final_weights(runs / "lm-fsdp"), final_weights(runs / "lm-ref"))
    got, want = (json.loads((runs / r / "eval_results.json").read_text()) for r in ("lm-fsdp", "lm-ref"))
    assert abs(got["eval_loss"] - want["eval_loss"]) <= 1e-5 * abs(want["eval_loss"])
    key = lambda x: (x["reference"], x["prediction"])  # noqa: E731  (gathered in shard order)
    assert len(got["samples"]) == 5 and sorted(got["samples"], key=key) == sorted(want["samples"], key=key)


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_zero3_cli_on_deepspeeds_cpu_accelerator_equals_one_process(ws, refs, method):
    """DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu, set by the CLI on a machine without CUDA) partitions every parameter;
    the adapter, gathered on save, equals one process's. One launch per run: Accelerate takes a DeepSpeed plugin
    only in the first Accelerator of a process."""
    run = ws / "runs" / f"{method}-zero3"
    p = torchrun("-m", "unipeft.cli", *train_args(ws, method, run, "--distributed", "zero3"))
    assert p.stdout.count("cpu x2 (DeepSpeed ZeRO-3)") == 1, p.stdout[-3000:]
    assert_same_run(run, refs[method])
    same_logits(ws, run / "adapter", refs[method] / "adapter")


def test_zero3_checkpoint_resumes_on_one_process(ws, refs):
    """A 2-process ZeRO-3 run stopped after step 3 writes the DDP/FSDP2 checkpoint format (the fp32 master weights
    and the optimizer state gathered by parameter name, unipeft.distributed.zero_optimizer_state), no per-process
    partitions; one plain process resumes it (global batch kept: accumulation 2) to the uninterrupted one-process
    run's weights to 1e-5 relative, as the uninterrupted ZeRO-3 run above (measured 3e-6; without the Adam moments
    the resumed weights miss by 4e-2)."""
    run = ws / "runs" / "lora-zero3-stop"
    p = torchrun("-m", "unipeft.cli", *train_args(ws, "lora", run, "--distributed", "zero3"), ok=False,
                 env={"UNIPEFT_STOP_AT_STEP": "3"})
    assert p.returncode != 0 and "interrupted at step 3" in p.stderr, p.stderr[-3000:]
    ckpt = run / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert (ckpt / "optimizer.pt").is_file() and not list(ckpt.glob("optimizer_*.pt"))
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    names = sorted(final_weights(run))
    assert sorted(saved["state"]) == names and sorted(saved["param_groups"][0]["params"]) == names
    assert all(int(s["step"]) == 3 for s in saved["state"].values())
    # run.yaml keeps --distributed zero3; one process without a launcher runs it plainly
    assert in_process("train", "--output", run, "--resume", "--distributed", "ddp") == 0
    close(final_weights(run), final_weights(refs["lora"]), rtol=1e-5)
    assert [r["step"] for r in records(run)[0]] == [1, 2, 3, 4, 5]


def test_one_process_checkpoint_resumes_under_zero3_on_two(ws, refs):
    """The reverse: a plain one-process run (accumulation 2) stopped after step 3 resumes under ZeRO-3 on 2
    processes (load_zero_optimizer_state partitions its name-keyed state) to the uninterrupted run's weights.
    ZeRO-2 refuses it, saying why: it loads only its own per-process partitions."""
    run = ws / "runs" / "lora-one-stop"
    assert in_process(*train_args(ws, "lora", run, "--grad-accum", "2"), env={"UNIPEFT_STOP_AT_STEP": "3"}) == 130
    p = torchrun("-m", "unipeft.cli", "train", "--output", run, "--resume", "--distributed", "zero2", ok=False)
    assert p.returncode != 0 and "ZeRO-1/2 load only their own per-process partitions" in p.stderr, p.stderr[-3000:]
    torchrun("-m", "unipeft.cli", "train", "--output", run, "--resume", "--distributed", "zero3")
    close(final_weights(run), final_weights(refs["lora"]), rtol=1e-5)
    assert [r["step"] for r in records(run)[0]] == [1, 2, 3, 4, 5]


def test_zero2_checkpoint_resumes_on_one_process_and_partitions_alone_are_refused(ws, refs, capsys):
    """ZeRO-2 writes the name-keyed state too (beside its per-process partitions, which only ZeRO-2 on the same
    number of processes loads): one plain process resumes it to the uninterrupted run's weights (1e-5, as above).
    A checkpoint with partitions only (as ZeRO-2 wrote before) is refused, naming the process count it needs."""
    import shutil

    run = ws / "runs" / "lora-zero2-stop"
    p = torchrun("-m", "unipeft.cli", *train_args(ws, "lora", run, "--distributed", "zero2"), ok=False,
                 env={"UNIPEFT_STOP_AT_STEP": "3"})
    assert p.returncode != 0 and "interrupted at step 3" in p.stderr, p.stderr[-3000:]
    ckpt = run / "checkpoint"
    assert sorted(f.name for f in ckpt.glob("optimizer*.pt")) == ["optimizer.pt", "optimizer_0.pt", "optimizer_1.pt"]
    old = ws / "runs" / "lora-zero2-partitions-only"
    shutil.copytree(run, old)
    (old / "checkpoint" / "optimizer.pt").unlink()
    assert in_process("train", "--output", run, "--resume", "--distributed", "ddp") == 0
    close(final_weights(run), final_weights(refs["lora"]), rtol=1e-5)
    capsys.readouterr()
    assert in_process("train", "--output", old, "--resume", "--distributed", "ddp") == 2
    err = capsys.readouterr().err
    assert "ZeRO-1/2 run on 2 processes" in err and "--nproc_per_node 2" in err, err[-2000:]


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun started (its children, RANK in their environment)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher_pid and "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc (Linux)")
@pytest.mark.parametrize("target", ["rank 1", "process group"])
def test_ctrl_c_stops_every_process_after_the_same_step_and_resumes(ws, target):
    """SIGINT mid-run to rank 1 alone of a 2-process FSDP2 run, or to the whole process group as a terminal sends it
    (then torchrun forwards it again: the same Ctrl-C, not a second one): every process stops after the same step
    (they agree in the step's collective), a resumable checkpoint is written, and resuming (on 1 process) reaches
    the weights of an uninterrupted run. A constant learning rate: the resumed and the reference runs stop at a
    step known only after the signal, so their --max-steps differs from the interrupted run's."""
    runs = ws / "runs"
    out = runs / f"ctrl-c-{target.replace(' ', '-')}"
    args = ["train", "--model", ws / "bert", "--task", "seq-cls", "--train", ws / "train.jsonl", "--method", "lora",
            "--lora-dropout", "0", "--batch-size", "2", "--lr", "0.01", "--scheduler", "constant", "--warmup", "0",
            "--log-every", "1", "--save-every", "100000", "--output", out]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "unipeft.cli", *map(str, args), "--max-steps", "100000", "--distributed", "fsdp"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline, sent = time.time() + 300, False
        while time.time() < deadline and proc.poll() is None:
            log = out / "metrics.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 3:  # 3 steps done: mid-run
                if target == "rank 1":
                    os.kill(_worker_pids(proc.pid)[1], signal.SIGINT)
                else:
                    os.killpg(proc.pid, signal.SIGINT)
                sent = True
                break
            time.sleep(0.2)
        assert sent, "the run did not reach step 3 in time"
        stdout, stderr = proc.communicate(timeout=120)  # must not hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    stopped = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert 3 <= stopped < 100000
    # both processes report the same step (each prints its own TrainingStopped), exit 130
    assert stderr.count(f"interrupted at step {stopped}/100000") == 2, stderr[-3000:]
    assert [r["step"] for r in records(out)[0]] == list(range(1, stopped + 1))
    total = stopped + 2
    assert in_process("train", "--output", out, "--resume", "--max-steps", total) == 0
    ref = runs / f"ctrl-c-ref-{stopped}"
    if not (ref / "checkpoint").is_dir():
        assert in_process(*args[:-1], ref, "--max-steps", total, "--grad-accum", "2") == 0
    close(final_weights(out), final_weights(ref))


class _Rank:
    """What run_eval asks of an Accelerator, for process `index` of `n` (no process group: records are not gathered
    here, the test unions them)."""

    def __init__(self, index: int, n: int):
        self.process_index, self.num_processes = index, n

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.parametrize("rows,batch_size,n", [(5, 2, 2), (1, 2, 2), (7, 3, 4), (4, 2, 2)])
def test_eval_gives_every_process_the_same_number_of_forwards_and_counts_each_row_once(monkeypatch, rows, batch_size,
                                                                                       n):
    """Sharded forwards are collectives (FSDP2 / ZeRO-3 gather parameters block by block): a process with fewer eval
    batches would leave the others waiting forever. Every process runs the largest shard's number of batches;
    padding batches' results are dropped, so each row is counted exactly once."""
    from unipeft.cli import evaluate

    class Task:
        name = "seq-cls"

        def collate(self, chunk):
            return {"input_ids": torch.tensor([[f["row"]] for f in chunk])}

        def eval_records(self, logits, batch, chunk):
            return [f["row"] for f in chunk]

        def finalize(self, records):
            return records

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, input_ids):
            self.calls += 1
            return type("Out", (), {"logits": input_ids.float()})

    monkeypatch.setattr(evaluate, "_gather", lambda records, acc: records)
    feats = [{"row": i, "input_ids": [1] * (1 + i % 3)} for i in range(rows)]
    calls, seen = [], []
    for rank in range(n):
        model = Model()
        seen += evaluate.run_eval(model, Task(), feats, batch_size, _Rank(rank, n))
        calls.append(model.calls)
    assert len(set(calls)) == 1 and calls[0] == -(-(-(-rows // n)) // batch_size), calls
    assert sorted(seen) == list(range(rows))
