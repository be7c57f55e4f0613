"""HF PEFT's seq2seq notebooks (LoRA, IA3, prefix tuning on a T5/mT0), import switched to unipeft: sentence ->
sentiment word, labels padded with -100, a plain PyTorch loop, save_pretrained, reload through
PeftConfig.from_pretrained, generate."""

from __future__ import annotations

import pytest
import torch
from kit import (TEXTS, assert_adapter_only, assert_reload_same, assert_same_logits, hf_logits, one_thread,  # noqa: F401
                 tiny_base)
from torch.utils.data import DataLoader
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, get_linear_schedule_with_warmup

from unipeft import IA3Config, LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model

LABELS = {0: "negative", 1: "positive"}


def notebook(model_name_or_path: str, peft_config, lr: float, num_epochs: int, out):
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)

    def preprocess_function(examples):
        model_inputs = tokenizer([x for x, _ in examples], max_length=16, padding="max_length", truncation=True,
                                 return_tensors="pt")
        labels = tokenizer([LABELS[y] for _, y in examples], max_length=3, padding="max_length", truncation=True,
                           return_tensors="pt")["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        model_inputs["labels"] = labels
        return model_inputs

    train_dataloader = DataLoader(TEXTS, shuffle=True, collate_fn=preprocess_function, batch_size=8,
                                  generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_name_or_path)
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(optimizer=optimizer, num_warmup_steps=0,
                                                   num_training_steps=len(train_dataloader) * num_epochs)
    epoch_losses = []
    for epoch in range(num_epochs):
        model.train()
        total_loss = 0.0
        for step, batch in enumerate(train_dataloader):
            outputs = model(**batch)
            loss = outputs.loss
            total_loss += loss.detach().float().item()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        epoch_losses.append(total_loss / len(train_dataloader))
    model.eval()
    batch = preprocess_function(TEXTS[:4])
    batch["labels"][batch["labels"] == -100] = tokenizer.pad_token_id  # decoder inputs for comparing logits
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=3, do_sample=False)
    model.save_pretrained(out)

    config = PeftConfig.from_pretrained(out)
    inference = AutoModelForSeq2SeqLM.from_pretrained(config.base_model_name_or_path)
    inference = PeftModel.from_pretrained(inference, out)
    with torch.no_grad():
        reloaded = inference(**batch).logits
    return dict(model=model, losses=epoch_losses, logits=logits, reloaded=reloaded, generated=generated,
                inputs=dict(batch))


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("t5"), "t5")


PROGRAMS = {  # each notebook's config line
    "lora": (lambda: LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32,
                                lora_dropout=0.1), 1e-2),
    "ia3": (lambda: IA3Config(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, feedforward_modules=[]), 3e-1),
    "prefix": (lambda: PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False,
                                          num_virtual_tokens=20), 1e-2),  # the notebook's lr
}
_RUNS: dict = {}


def run_of(method, t5_path, tmp_path_factory):
    if method not in _RUNS:
        out = tmp_path_factory.mktemp(method) / "out"
        make_config, lr = PROGRAMS[method]
        _RUNS[method] = notebook(t5_path, make_config(), lr, 4, out), out
    return _RUNS[method]


def hf_prefix_losses(t5_path, tmp_path_factory) -> list[float]:
    """The same notebook run with HF PEFT's get_peft_model and config (the oracle)."""
    import peft

    make_config, lr = PROGRAMS["prefix"]
    cfg = peft.PrefixTuningConfig(**{k: v for k, v in make_config().to_dict().items()
                                     if k in ("task_type", "inference_mode", "num_virtual_tokens")})
    global get_peft_model
    ours, get_peft_model = get_peft_model, peft.get_peft_model
    try:
        return notebook(t5_path, cfg, lr, 4, tmp_path_factory.mktemp("hf_prefix") / "out")["losses"]
    finally:
        get_peft_model = ours


@pytest.mark.parametrize("method", sorted(PROGRAMS))
def test_seq2seq_program(method, t5_path, tmp_path_factory):
    run, out = run_of(method, t5_path, tmp_path_factory)
    if method == "prefix":  # HF's one-table T5 prefix learns slowly on this tiny model: HF PEFT's own run is the bar
        assert run["losses"][-1] < run["losses"][0], run["losses"]
        torch.testing.assert_close(run["losses"], hf_prefix_losses(t5_path, tmp_path_factory), rtol=0, atol=1e-4)
    else:
        assert run["losses"][-1] < 0.9 * run["losses"][0], run["losses"]
    assert_adapter_only(out, run["model"])
    assert_reload_same(run["reloaded"], run["logits"])
    assert run["generated"].shape == (4, 4)  # decoder start + 3 new tokens
    # the card tells the hub which library loads the folder: HF PEFT, since every file here is in its layout
    assert "library_name: peft" in (out / "README.md").read_text()


@pytest.mark.parametrize("method", [
    "lora", "ia3",
    "prefix"])
def test_seq2seq_file_gives_hf_the_same_logits(method, t5_path, tmp_path_factory):
    run, out = run_of(method, t5_path, tmp_path_factory)
    assert_same_logits(hf_logits(AutoModelForSeq2SeqLM, t5_path, out, run["inputs"]), run["logits"])
