"""transformers.Trainer runs unchanged on our PeftModel, written as the transformers/HF PEFT docs write it (with
`from peft import` switched to `from unipeft import`): adapter-only checkpoints, per-epoch eval and save,
load_best_model_at_end, exact resume, tied embeddings, checkpoints that load as adapters. Each flow runs both with
HF PEFT installed (as here) and with it "not installed" (its availability checks patched to False)."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama

pytest.importorskip("datasets")
from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.utils import find_labels  # noqa: E402

from unipeft import (IA3Config, LoraConfig, PeftModel, PeftModelForCausalLM, PrefixTuningConfig,  # noqa: E402
                     PromptTuningConfig, TaskType, get_peft_model)

LORA = dict(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def pattern_data(n: int, length: int = 16, start: int = 0) -> Dataset:
    """Counting sequences modulo 20 (ids 3..22): a pattern a tiny model learns in a few steps."""
    rows = [[3 + (s + i) % 20 for i in range(length)] for s in range(start, start + n)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * length] * n, "labels": rows})


def peft_absent(monkeypatch) -> None:
    """Make transformers, accelerate and TRL behave as if HF PEFT were not installed: every availability check
    answers False and the names they import from peft when it is installed are gone."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(("transformers", "accelerate", "trl")):
            continue
        d = getattr(mod, "__dict__", {})
        if "is_peft_available" in d:
            monkeypatch.setattr(mod, "is_peft_available", lambda: False)
        for peft_name in ("PeftModel", "PeftMixedModel", "PeftConfig", "BaseTunerLayer"):
            if peft_name in d and getattr(d[peft_name], "__module__", "").startswith("peft"):
                monkeypatch.delattr(mod, peft_name)


@pytest.fixture(params=["peft-installed", "peft-absent"])
def peft_world(request, monkeypatch):
    if request.param == "peft-absent":
        peft_absent(monkeypatch)
    return request.param


def tied_lora_model(seed: int = 0, lora_seed: int = 0):
    base = tiny_llama(seed, tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    torch.manual_seed(lora_seed)
    return get_peft_model(base, LoraConfig(**LORA))


def args_for(out: Path, **kw) -> TrainingArguments:
    defaults = dict(output_dir=str(out), eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", num_train_epochs=3, per_device_train_batch_size=8,
                    per_device_eval_batch_size=8, learning_rate=5e-2, seed=0, report_to="none", use_cpu=True,
                    logging_steps=1, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **kw})


def adapter_weights(peft) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.adapter_state_dict().items()}


def assert_adapter_only(folder: Path, peft) -> None:
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    keys = load_file(str(folder / "adapter_model.safetensors")).keys()
    assert keys and all("lora_" in k for k in keys), sorted(keys)
    size = (folder / "adapter_model.safetensors").stat().st_size
    adapter_bytes = sum(4 * v.numel() for v in peft.adapter_state_dict().values())
    base_bytes = sum(4 * p.numel() for p in peft.get_base_model().parameters() if not p.requires_grad)
    header = 256 * len(keys) + 4096  # safetensors' JSON header: a name, dtype, shape and offsets per tensor
    assert size < adapter_bytes + header and size < base_bytes / 4, (size, adapter_bytes, base_bytes)


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def test_task_class_and_signature():
    peft = tied_lora_model()
    assert type(peft) is PeftModelForCausalLM and isinstance(peft, PeftModel)
    params = inspect.signature(type(peft).forward).parameters
    assert {"input_ids", "attention_mask", "labels"} <= set(params)
    assert find_labels(type(peft)) == ["labels"]  # what Trainer finds when it inspects the class itself
    ids, mask, pos = torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 5, 9, 20]])
    base = peft.get_base_model()
    with torch.no_grad():  # positional arguments keep the model's own order (Llama: input_ids, mask, position_ids)
        torch.testing.assert_close(peft(ids).logits, peft(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(peft(ids, mask, pos).logits, base(ids, mask, pos).logits, rtol=0, atol=0)
        assert (peft(ids, mask, pos).logits - peft(ids, mask).logits).abs().max() > 1e-4  # position_ids did matter


def test_trainer_quicktour_flow(tmp_path, peft_world):
    peft = tied_lora_model()
    embed_before = peft.get_base_model().model.embed_tokens.weight.detach().clone()
    trainer = Trainer(model=peft, args=args_for(tmp_path / "run"), train_dataset=pattern_data(32),
                      eval_dataset=pattern_data(16, start=7))
    trainer.train()
    base = peft.get_base_model()

    # per-epoch eval and save, eval_loss found, the loss falls
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2] and losses[-1] < losses[0] - 0.15, (losses, evals)
    cks = checkpoints(tmp_path / "run")
    assert [c.name for c in cks] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    for c in cks:
        assert_adapter_only(c, peft)

    # the best checkpoint is the one with the lowest eval_loss, and the model holds its adapter
    best = cks[min(range(3), key=lambda i: evals[i])]
    assert Path(trainer.state.best_model_checkpoint) == best
    saved = load_file(str(best / "adapter_model.safetensors"))
    for k, v in adapter_weights(peft).items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)

    # tied embeddings: still tied, frozen, untouched
    assert base.lm_head.weight is base.model.embed_tokens.weight
    torch.testing.assert_close(base.model.embed_tokens.weight, embed_before, rtol=0, atol=0)

    # save_model is adapter-only, and it and every checkpoint load as adapters with identical logits
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only(tmp_path / "final", peft)
    batch = pattern_data(2, start=3)[:]
    ids = torch.tensor(batch["input_ids"])
    peft.eval()
    with torch.no_grad():
        want = peft(input_ids=ids).logits
    for folder in (tmp_path / "final", best):
        loaded = PeftModel.from_pretrained(tiny_llama(0, tie_word_embeddings=True), str(folder))
        assert type(loaded) is PeftModelForCausalLM
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=1e-6)


def test_load_best_model_at_end_restores_an_earlier_adapter(tmp_path, peft_world):
    # greater_is_better=True on eval_loss makes the first epoch "best" while the loss falls: the model must
    # end with checkpoint-4's adapter, not the last one it trained
    peft = tied_lora_model()
    trainer = Trainer(model=peft, args=args_for(tmp_path, greater_is_better=True), train_dataset=pattern_data(32),
                      eval_dataset=pattern_data(16, start=7))
    trainer.train()
    cks = checkpoints(tmp_path)
    assert Path(trainer.state.best_model_checkpoint) == cks[0]
    first, last = (load_file(str(c / "adapter_model.safetensors")) for c in (cks[0], cks[-1]))
    now = adapter_weights(peft)
    assert max((first[k] - last[k]).abs().max().item() for k in first) > 1e-3
    for k, v in now.items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=0)


def test_exact_resume(tmp_path, peft_world):
    data, evals = pattern_data(32), pattern_data(16, start=7)
    full = tied_lora_model()
    Trainer(model=full, args=args_for(tmp_path / "full", load_best_model_at_end=False), train_dataset=data,
            eval_dataset=evals).train()
    want = adapter_weights(full)

    # interrupted after epoch 1: a fresh process builds the model (another LoRA init, so only the checkpoint can
    # make it equal) and resumes from the checkpoint
    resumed = tied_lora_model(lora_seed=123)
    trainer = Trainer(model=resumed, args=args_for(tmp_path / "full", load_best_model_at_end=False),
                      train_dataset=data, eval_dataset=evals)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    got = adapter_weights(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_recognised_as_peft_model_by_transformers_and_accelerate(peft_world):
    from accelerate.utils import is_peft_model
    from transformers.trainer_utils import _is_peft_model, unwrap_peft_model

    peft = tied_lora_model()
    assert _is_peft_model(peft) and is_peft_model(peft)
    assert unwrap_peft_model(peft) is peft.get_base_model()
    assert not _is_peft_model(peft.get_base_model()) and not is_peft_model(torch.nn.Linear(2, 2))


def test_imported_after_the_model_is_built(tmp_path):
    """transformers.Trainer imported only after get_peft_model still recognises the model (a fresh process)."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from conftest import tiny_llama\n"
        "from unipeft import get_peft_model, LoraConfig\n"
        "peft = get_peft_model(tiny_llama(0), LoraConfig(task_type='CAUSAL_LM', r=2, target_modules=['q_proj']))\n"
        "import transformers.trainer as t, trl.trainer.sft_trainer as s\n"
        "assert t._is_peft_model(peft) and s.is_peft_model(peft), 'not recognised'\n"
        "print('ok')\n"
    ) % str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_load_adapter_refuses_another_config(tmp_path):
    peft = tied_lora_model()
    peft.save_pretrained(str(tmp_path / "a"))
    other = get_peft_model(tiny_llama(0, tie_word_embeddings=True), LoraConfig(**{**LORA, "lora_alpha": 16}))
    with pytest.raises(ValueError, match="lora_alpha"):
        other.load_adapter(str(tmp_path / "a"), "default")
    peft.load_adapter(str(tmp_path / "a"), "second")  # another name: a second adapter beside the first
    assert peft.active_adapters == ["default"] and set(peft.peft_config) == {"default", "second"}


OTHER_METHODS = {
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
                                                encoder_hidden_size=16),
}


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_other_methods_checkpoint_best_and_resume(tmp_path, method):
    """Every checkpoint is the adapter alone, load_best_model_at_end reloads it and resume is exact, beyond LoRA."""
    data, evals = pattern_data(16), pattern_data(8, start=7)
    args = dict(num_train_epochs=2, learning_rate=1e-2)

    def model(seed):
        torch.manual_seed(seed)
        return get_peft_model(tiny_llama(0, tie_word_embeddings=True), OTHER_METHODS[method]())

    full = model(0)
    trainer = Trainer(model=full, args=args_for(tmp_path, greater_is_better=True, **args), train_dataset=data,
                      eval_dataset=evals)
    trainer.train()
    cks = checkpoints(tmp_path)
    assert [c.name for c in cks] == ["checkpoint-2", "checkpoint-4"]
    for c in cks:
        files = set(os.listdir(c))
        assert "adapter_model.safetensors" in files and not files & {"model.safetensors", "pytorch_model.bin"}
    first = load_file(str(cks[0] / "adapter_model.safetensors"))
    assert Path(trainer.state.best_model_checkpoint) == cks[0]  # the loss falls, so the first is "best" here
    for k, v in adapter_weights(full).items():
        torch.testing.assert_close(v, first[k], rtol=0, atol=0)

    last = load_file(str(cks[1] / "adapter_model.safetensors"))
    resumed = model(123)
    Trainer(model=resumed, args=args_for(tmp_path, load_best_model_at_end=False, **args), train_dataset=data,
            eval_dataset=evals).train(resume_from_checkpoint=str(cks[0]))
    got = adapter_weights(resumed)
    assert got.keys() == last.keys()
    for k in last:
        torch.testing.assert_close(got[k], last[k], rtol=0, atol=1e-6)


@pytest.mark.real
def test_smollm2_tied_embeddings_checkpoint_and_resume(tmp_path):
    """The real SmolLM2-135M (tied embeddings, the model of the issue's crash): adapter-only checkpoints under
    600 KB against the 540 MB model, exact resume."""
    from unipeft.cli import embedded as models

    try:
        models.embedded_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    model, tok = models.load_embedded()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    texts = ["The capital of France is Paris.", "Two plus two is four.", "Water boils at 100 degrees.",
             "The sky is blue."]
    enc = tok(texts, padding="max_length", max_length=12, truncation=True)
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    data = Dataset.from_dict({**enc, "labels": labels})
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    args = dict(num_train_epochs=2, per_device_train_batch_size=2, learning_rate=1e-3, load_best_model_at_end=False,
                eval_strategy="no")

    peft = get_peft_model(model, lora)
    Trainer(model=peft, args=args_for(tmp_path, **args), train_dataset=data).train()
    want = adapter_weights(peft)
    cks = checkpoints(tmp_path)
    assert [c.name for c in cks] == ["checkpoint-2", "checkpoint-4"]
    for c in cks:
        assert_adapter_only(c, peft)
        assert (c / "adapter_model.safetensors").stat().st_size < 600_000  # LoRA r=2 on q, v: 460,800 bytes

    resumed = get_peft_model(peft.unload(), lora)  # the same base, a fresh adapter
    Trainer(model=resumed, args=args_for(tmp_path, **args), train_dataset=data).train(
        resume_from_checkpoint=str(cks[0]))
    got = adapter_weights(resumed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_sequence_classification_quicktour(tmp_path, peft_world):
    """The transformers quicktour shape: a `label` column, a classifier head trained and saved with the adapter,
    eval_loss for the best model, resume."""
    from conftest import tiny_bert

    from unipeft import PeftModelForSequenceClassification

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (24, 10), generator=g)
    labels = (ids[:, 0] % 3).tolist()  # the class is in the first token
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 10] * 24, "label": labels})
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    args = dict(num_train_epochs=2, learning_rate=2e-2)

    peft = get_peft_model(tiny_bert(0), cfg)
    assert type(peft) is PeftModelForSequenceClassification
    trainer = Trainer(model=peft, args=args_for(tmp_path, **args), train_dataset=data, eval_dataset=data)
    assert trainer.label_names == ["labels"]
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0]
    cks = checkpoints(tmp_path)
    keys = load_file(str(cks[-1] / "adapter_model.safetensors")).keys()
    assert any("classifier" in k for k in keys) and any("lora_" in k for k in keys)
    assert not any("word_embeddings" in k or ("attention" in k and "lora_" not in k) for k in keys), sorted(keys)
    want = adapter_weights(peft)

    resumed = get_peft_model(tiny_bert(0), cfg)
    Trainer(model=resumed, args=args_for(tmp_path, **args), train_dataset=data, eval_dataset=data).train(
        resume_from_checkpoint=str(cks[0]))
    got = adapter_weights(resumed)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
