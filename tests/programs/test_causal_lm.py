"""HF PEFT's causal-LM notebooks (prompt tuning with a text init, prefix tuning), import switched to unipeft:
"Tweet text : ... Label : " prompts with left padding and the loss on the label only, a plain PyTorch loop,
save_pretrained, PeftConfig.from_pretrained -> base -> PeftModel.from_pretrained, generate."""

from __future__ import annotations

import pytest
import torch
from kit import (TEXTS, assert_adapter_only, assert_reload_same, assert_same_logits, assert_same_logits_unpadded, hf_logits, one_thread,  # noqa: F401
                 tiny_base)
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from unipeft import PeftConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

LABELS = {0: "complaint", 1: "no complaint"}


def notebook(model_name_or_path: str, peft_config, lr: float, num_epochs: int, out):
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, padding_side="left")
    max_length = 24

    def preprocess_function(examples):
        inputs = [f"Tweet text : {x} Label : " for x, _ in examples]
        targets = [LABELS[y] for _, y in examples]
        ids, labels = [], []
        for x, y in zip(inputs, targets):
            sample = tokenizer(x, add_special_tokens=False)["input_ids"]
            label = tokenizer(y, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
            seq = (sample + label)[-max_length:]
            pad = max_length - len(seq)
            ids.append([tokenizer.pad_token_id] * pad + seq)  # left padding, as the notebook
            labels.append([-100] * (pad + len(seq) - len(label)) + label)
        input_ids = torch.tensor(ids)
        return {"input_ids": input_ids, "attention_mask": (input_ids != tokenizer.pad_token_id).long(),
                "labels": torch.tensor(labels)}

    train_dataloader = DataLoader(TEXTS, shuffle=True, collate_fn=preprocess_function, batch_size=8,
                                  generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
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
    inputs = tokenizer(["Tweet text : @nationalgridus I have no water and the bill is current and paid. Label : ",
                        "Tweet text : great service today Label : "], return_tensors="pt", padding=True,
                       add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        generated = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.sep_token_id)
    model.save_pretrained(out)

    config = PeftConfig.from_pretrained(out)
    inference = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
    inference = PeftModel.from_pretrained(inference, out)
    with torch.no_grad():
        reloaded = inference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return dict(model=model, losses=epoch_losses, logits=logits, reloaded=reloaded, generated=generated,
                inputs={k: inputs[k] for k in ("input_ids", "attention_mask")})


def check(run, out) -> None:
    assert run["losses"][-1] < 0.9 * run["losses"][0], run["losses"]
    assert_adapter_only(out, run["model"])
    assert_reload_same(run["reloaded"], run["logits"])
    assert run["generated"].shape[1] > run["inputs"]["input_ids"].shape[1]


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("llama"), "llama")


def prompt_config(model_name_or_path, text):
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.TEXT,
                              num_virtual_tokens=8, prompt_tuning_init_text=text,
                              tokenizer_name_or_path=model_name_or_path)


def test_causal_lm_prompt_tuning_program_as_published(llama_path, tmp_path):
    config = prompt_config(llama_path, "Classify if the tweet is a complaint or not:")
    check(notebook(llama_path, config, 3e-2, 4, tmp_path / "out"), tmp_path / "out")


def test_causal_lm_prompt_tuning_program(llama_path, tmp_path):
    """The same notebook with an init text that fits in the 8 virtual tokens."""
    run = notebook(llama_path, prompt_config(llama_path, "Classify the tweet:"), 3e-2, 4, tmp_path / "out")
    check(run, tmp_path / "out")
    assert_same_logits_unpadded(hf_logits(AutoModelForCausalLM, llama_path, tmp_path / "out", run["inputs"]),
                                run["logits"], run["inputs"]["attention_mask"])


@pytest.fixture(scope="module")
def prefix_run(llama_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix") / "out"
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=30)
    return notebook(llama_path, config, 3e-2, 4, out), out


def test_causal_lm_prefix_tuning_program(prefix_run):
    check(*prefix_run)


def test_causal_lm_prefix_file_gives_hf_the_same_logits(prefix_run, llama_path):
    run, out = prefix_run
    assert_same_logits_unpadded(hf_logits(AutoModelForCausalLM, llama_path, out, run["inputs"]), run["logits"],
                                run["inputs"]["attention_mask"])
