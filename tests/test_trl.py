"""TRL's SFTTrainer on our PeftModel, written as TRL's docs write it with `from peft import` switched to
`from unipeft import`. `SFTTrainer(model=get_peft_model(...))` trains and saves adapter-only checkpoints, with HF
PEFT installed and "not installed"; `SFTTrainer(peft_config=<our LoraConfig>)` is refused by TRL's own type
check (documented: pass model=get_peft_model(...) instead)."""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from test_trainer import assert_adapter_only, checkpoints, peft_world  # noqa: F401  (fixture)

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from unipeft import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig,  # noqa: E402
                     get_peft_model)

LORA = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])


def char_tokenizer():
    """A character-level tokenizer whose ids fit the tiny Llama (pad 0, bos 1, eos 2 as in its config)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}, " ": 29, "<unk>": 30}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def text_data(n: int, start: int = 0) -> Dataset:
    return Dataset.from_dict({"text": ["".join(chr(97 + (s + i) % 20) for i in range(15))
                                       for s in range(start, start + n)]})


def sft_args(out, **kw) -> SFTConfig:
    defaults = dict(output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=8, learning_rate=5e-2,
                    save_strategy="epoch", eval_strategy="epoch", report_to="none", use_cpu=True, bf16=False,
                    logging_steps=1, max_length=32, seed=0, dataloader_num_workers=0)
    return SFTConfig(**{**defaults, **kw})


def test_sft_trainer_with_get_peft_model(tmp_path, peft_world):
    base = tiny_llama(0, tie_word_embeddings=True)
    peft = get_peft_model(base, LoraConfig(**LORA))
    trainer = SFTTrainer(model=peft, args=sft_args(tmp_path / "run"), train_dataset=text_data(32),
                         eval_dataset=text_data(16, start=7), processing_class=char_tokenizer())
    assert trainer.model is peft
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2] and losses[-1] < losses[0] - 0.15, (losses, evals)
    cks = checkpoints(tmp_path / "run")
    assert len(cks) == 3
    for c in cks:
        assert_adapter_only(c, peft)
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only(tmp_path / "final", peft)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied

    # the final save holds the trained adapter and loads as one: the same logits from a fresh base
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    for k, v in peft.adapter_state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    peft.eval()
    loaded = PeftModel.from_pretrained(tiny_llama(0, tie_word_embeddings=True), str(tmp_path / "final"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=0, atol=1e-6)


METHODS = {
    "lora": lambda: LoraConfig(**LORA),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sft_fused_loss_equals_the_models_own_loss(tmp_path, method):
    """TRL's fused LM head runs on our base model's backbone, with the adapter: its loss is the model's loss
    (prompt methods included: their virtual tokens are inserted and masked before the backbone)."""
    peft = get_peft_model(tiny_llama(0, tie_word_embeddings=True), METHODS[method]())
    with torch.no_grad():  # a non-zero adapter, so that dropping it would show
        for n, p in peft.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    trainer = SFTTrainer(model=peft, args=sft_args(tmp_path, max_steps=1, eval_strategy="no"),
                         train_dataset=text_data(8), processing_class=char_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    peft.eval()
    with torch.no_grad():
        fused = trainer.compute_loss(peft, dict(batch))
        own = peft(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   labels=batch["labels"]).loss
        with peft.disable_adapter():
            without = peft(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           labels=batch["labels"]).loss
    torch.testing.assert_close(fused, own, rtol=1e-5, atol=1e-5)
    assert abs(own.item() - without.item()) > 1e-3  # 100x the tolerance above


def test_adapter_on_lm_head_is_refused_under_the_fused_head(tmp_path):
    peft = get_peft_model(tiny_llama(0), LoraConfig(**{**LORA, "target_modules": ["q_proj", "lm_head"]}))
    trainer = SFTTrainer(model=peft, args=sft_args(tmp_path, max_steps=1, eval_strategy="no"),
                         train_dataset=text_data(8), processing_class=char_tokenizer())
    with pytest.raises(ValueError, match="fused LM head.*lm_head"):
        trainer.train()


def test_sft_trainer_peft_config_is_refused_by_trl(tmp_path, peft_world):
    """TRL accepts `peft_config` only as an HF PEFT object and builds the model with HF PEFT's get_peft_model
    (trl/trainer/sft_trainer.py: `if not is_peft_available(): raise ImportError(...)` then
    `if not isinstance(peft_config, PeftConfig): raise TypeError(...)`), so our config cannot pass without
    changing TRL; the documented way is SFTTrainer(model=get_peft_model(base, config))."""
    import trl.trainer.sft_trainer as sft

    src = inspect.getsource(sft.SFTTrainer.__init__)
    assert "if not isinstance(peft_config, PeftConfig):" in src and "model = get_peft_model(model, peft_config" in src
    error = ImportError if peft_world == "peft-absent" else TypeError
    with pytest.raises(error, match="peft"):
        SFTTrainer(model=tiny_llama(0), args=sft_args(tmp_path, max_steps=1, eval_strategy="no"),
                   train_dataset=text_data(8), processing_class=char_tokenizer(), peft_config=LoraConfig(**LORA))
