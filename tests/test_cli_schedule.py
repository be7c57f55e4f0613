"""The CLI's learning-rate schedules (cli/schedule.py): equal to transformers' get_scheduler for every name the CLI
accepts (transformers is the oracle here only), resumable from a checkpoint written with get_scheduler, and
`unipeft train` no longer loads HF PEFT through transformers.optimization."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from unipeft.cli import options as O
from unipeft.cli.schedule import make_schedule

HF_NAME = {"constant": "constant_with_warmup"}  # the CLI's name -> get_scheduler's


def _cli_schedule_names():
    return next(o.choices for o in O.OPTIONS if o.name == "scheduler")


def _opt(lr=0.1):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", _cli_schedule_names())
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (4, 4), (1, 1), (6, 37)])
def test_schedule_equals_transformers_get_scheduler(name, warmup, total):
    from transformers import get_scheduler

    ours = _lrs(make_schedule(name, _opt(), warmup, total), total + 3)
    ref = _lrs(get_scheduler(HF_NAME.get(name, name), _opt(), num_warmup_steps=warmup, num_training_steps=total),
               total + 3)
    assert ours == pytest.approx(ref, abs=1e-12, rel=0)


def test_every_cli_schedule_name_is_built():
    assert set(_cli_schedule_names()) == {"linear", "cosine", "constant"}
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'poly'.*linear"):
        make_schedule("poly", _opt(), 1, 10)


@pytest.mark.parametrize("name", _cli_schedule_names())
def test_a_get_scheduler_checkpoint_resumes(name, tmp_path):
    """A scheduler.pt written by the previous code (get_scheduler's LambdaLR) loads as the loop loads it
    (weights_only) and the schedule continues exactly."""
    from transformers import get_scheduler

    warmup, total, k = 3, 12, 5
    old = get_scheduler(HF_NAME.get(name, name), _opt(), num_warmup_steps=warmup, num_training_steps=total)
    _lrs(old, k)
    torch.save(old.state_dict(), tmp_path / "scheduler.pt")
    new = make_schedule(name, _opt(), warmup, total)
    new.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    assert new.last_epoch == k
    assert _lrs(new, total - k) == pytest.approx(_lrs(old, total - k), abs=1e-12, rel=0)
    # and the other way: our state_dict is as loadable (a checkpoint of ours resumed by our own loop)
    torch.save(new.state_dict(), tmp_path / "ours.pt")
    again = make_schedule(name, _opt(), warmup, total)
    again.load_state_dict(torch.load(tmp_path / "ours.pt", weights_only=True))
    assert again.last_epoch == new.last_epoch


def test_unipeft_train_does_not_import_peft(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from unipeft.cli.embedded import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0)).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    (tmp_path / "cls.jsonl").write_text("".join(
        json.dumps({"text": f"a {w} movie", "label": "pos" if i % 2 else "neg"}) + "\n"
        for i, w in enumerate(["bad", "good", "awful", "great"] * 3)))
    prog = textwrap.dedent(f"""
        import sys
        from unipeft.cli import main
        rc = main(["train", "--model", {str(tmp_path / "bert")!r}, "--task", "seq-cls", "--train",
                   {str(tmp_path / "cls.jsonl")!r}, "--output", {str(tmp_path / "out")!r}, "--batch-size", "4",
                   "--max-steps", "2", "--scheduler", "cosine"])
        assert rc in (0, None), rc
        print("PEFT_MODULES", sorted(m for m in sys.modules if m == "peft" or m.startswith("peft."))[:3])
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "out/adapter/adapter_model.safetensors").exists()
    line = next(x for x in p.stdout.splitlines() if x.startswith("PEFT_MODULES"))
    assert line == "PEFT_MODULES []", line
