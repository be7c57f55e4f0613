"""The founding brief's import line, as HF PEFT's README quickstart and accelerate example scripts use it:
a config from a plain dict (get_peft_config), training, an adapter checkpoint written with
get_peft_model_state_dict and restored with set_peft_model_state_dict, then save_pretrained and inference
through AutoPeftModelForCausalLM + generate."""

from __future__ import annotations

import torch
from kit import TEXTS, assert_adapter_only, assert_same_logits, one_thread, tiny_base  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from unipeft import get_peft_config, get_peft_model, LoraConfig, TaskType  # the founding brief's line
from unipeft import AutoPeftModelForCausalLM, get_peft_model_state_dict, set_peft_model_state_dict


def test_founding_brief_program(tmp_path):
    model_name_or_path = tiny_base(tmp_path / "base", "llama")
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": False, "r": 8, "lora_alpha": 32,
              "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    peft_config = get_peft_config(config)
    assert isinstance(peft_config, LoraConfig) and peft_config.task_type == TaskType.CAUSAL_LM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path)
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()
    batch = tokenizer([t for t, _ in TEXTS[:8]], padding=True, return_tensors="pt", return_token_type_ids=False)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    model.train()
    for step in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits

    # the accelerate examples' checkpoint: only the adapter's tensors, taken from the full state_dict
    torch.save(get_peft_model_state_dict(model, state_dict=model.state_dict()), tmp_path / "adapter.pt")
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(model_name_or_path), get_peft_config(config)).eval()
    set_peft_model_state_dict(fresh, torch.load(tmp_path / "adapter.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, logits, rtol=0, atol=1e-5)

    model.save_pretrained(tmp_path / "out")
    assert_adapter_only(tmp_path / "out", model)
    inference = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(inference(**inputs).logits, logits, rtol=0, atol=1e-5)
        prompt = tokenizer(["the film is"], return_tensors="pt", return_token_type_ids=False)
        out = inference.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3

    import peft  # the oracle: HF PEFT's own AutoPeftModelForCausalLM loads the folder

    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        assert_same_logits(theirs(**inputs).logits, logits)
