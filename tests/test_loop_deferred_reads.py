"""Review of the loop's deferred device reads (cli/loop.py, cli/step_stats.py): the logged loss window and the RNG
kept in a checkpoint must be what they were when every step was read on the host."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_fast_path import _train as train_cli
from test_cli_fast_path import write_llama_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = write_llama_workspace(tmp_path_factory.mktemp("deferred"))
    rows = (root / "text.jsonl").read_text().splitlines(keepends=True)
    (root / "eval.jsonl").write_text("".join(rows[:3]))
    return root


def _train(ws, capsys, out, *extra):
    return train_cli(ws, capsys, out, *extra, batch_size=2)


def _step_losses(monkeypatch):
    from unipeft.cli import loop

    losses, orig = [], loop.Trainer.train_step

    def train_step(self, micro):
        loss, ntok = orig(self, micro)
        losses.append(float(loss))
        return loss, ntok

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    return losses


def test_logged_window_spans_every_step_since_the_last_log_despite_save_and_eval_reads(ws, capsys, monkeypatch):
    """Checkpoint (every 2) and evaluation (every 3) boundaries read the device too; the logged loss (every 4) is
    still the mean of all 4 steps since the previous log line, as when each step was read on the host."""
    losses = _step_losses(monkeypatch)
    code, io = _train(ws, capsys, "window", "--max-steps", "8", "--log-every", "4", "--save-every", "2",
                      "--eval", str(ws / "eval.jsonl"), "--eval-every", "3")
    assert code == 0, io.err
    logged = [json.loads(x) for x in (ws / "window/metrics.jsonl").read_text().splitlines()]
    logged = [x["loss"] for x in logged if "loss" in x and "eval_loss" not in x]
    assert len(losses) == 8
    assert logged == pytest.approx([sum(losses[0:4]) / 4, sum(losses[4:8]) / 4], rel=1e-12, abs=0)


def test_abort_mid_step_saves_the_rng_as_of_the_last_finished_step(ws, capsys, monkeypatch):
    """A second Ctrl-C (an abort) arrives during step 4's forward, after it drew random numbers (dropout): the
    checkpoint is step 3's, so its RNG must be the state at the end of step 3, not a mid-step one (a resume would
    then draw step 4's dropout masks from a different stream than the uninterrupted run)."""
    from unipeft.cli import loop

    orig, at_start = loop.Trainer.train_step, {}

    def train_step(self, micro):
        at_start[self.state.step + 1] = torch.get_rng_state().clone()
        if self.state.step + 1 == 4:
            torch.rand(100)  # the step's dropout draws, then the abort
            raise KeyboardInterrupt
        return orig(self, micro)

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    code, io = _train(ws, capsys, "abort", "--max-steps", "8", "--save-every", "100", "--lora-dropout", "0.1")
    assert code == 130, io.err
    assert json.loads((ws / "abort/checkpoint/state.json").read_text())["step"] == 3
    saved = torch.load(ws / "abort/checkpoint/rng_0.pt", weights_only=True)
    assert torch.equal(saved["torch"], at_start[4])
