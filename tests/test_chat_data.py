"""Chat data for causal-LM training (cli/chat_data.py, cli/lm.py): format detection, assistant-only labels checked
token by token against the SmolLM2 (ChatML) template's known layout written out by hand, templates that drop
content refused with the row named, truncation keeping labels aligned, and tokenizers without a template."""

from __future__ import annotations

import pytest

from unipeft.cli.errors import CliError
from unipeft.cli.lm import CausalLM

SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4"}]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in SYSTEM_CHAT]
# SmolLM2's template, written out: "<|im_start|>{role}\n{content}<|im_end|>\n" per turn; the assistant's trained
# text is its content and the end-of-turn token, not the newline after it, not the "assistant\n" header.
EXPECTED = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
            ("Hello!<|im_end|>", True),
            ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
            ("4<|im_end|>", True),
            ("\n", False)]
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from unipeft.cli.embedded import embedded_path

    t = AutoTokenizer.from_pretrained(str(embedded_path()))
    assert t.chat_template and "<|im_start|>" in t.chat_template
    return t


def _encode(tok, rows, opts=None, max_length=256):
    task = CausalLM.from_data(tok, max_length, rows, "data.jsonl", opts or {})
    feats, truncated = task.encode(rows, "data.jsonl")
    return task, feats, truncated


def _expected(tok, pieces):
    ids, labels = [], []
    for text, trained in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [-100] * len(part)
    return ids, labels


@pytest.mark.parametrize("row,fmt", [({"messages": SYSTEM_CHAT}, "messages"),
                                     ({"conversations": SHAREGPT}, "sharegpt")])
def test_multi_turn_label_mask_token_by_token(tok, row, fmt):
    task, (f,), _ = _encode(tok, [row])
    assert task.meta["format"] == fmt
    ids, labels = _expected(tok, EXPECTED)
    assert f["input_ids"] == ids
    assert f["labels"] == labels
    trained = [tok.decode([i]) for i, y in zip(f["input_ids"], f["labels"]) if y != -100]
    assert trained == ["Hello", "!", "<|im_end|>", "4", "<|im_end|>"]
    # generation eval: the prompt up to the last assistant turn, that turn's text as the reference
    assert tok.decode(f["prompt_ids"]) == "".join(t for t, _ in EXPECTED[:3])
    assert f["ref"] == "4"


@pytest.mark.parametrize("row,prompt", [
    ({"prompt": "Capital of France?", "completion": "Paris."}, "Capital of France?"),
    ({"instruction": "Name the capital.", "input": "France", "output": "Paris."}, "Name the capital.\n\nFrance"),
    ({"prompt": [{"role": "user", "content": "Capital of France?"}],
      "completion": [{"role": "assistant", "content": "Paris."}]}, "Capital of France?"),
])
def test_single_turn_formats_train_on_the_answer_only(tok, row, prompt):
    task, (f,), _ = _encode(tok, [row])
    assert task.meta["format"] == ("alpaca" if "instruction" in row else "prompt-completion")
    ids, labels = _expected(tok, [(DEFAULT_SYSTEM + f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
                                   False), ("Paris.<|im_end|>", True), ("\n", False)])
    assert (f["input_ids"], f["labels"]) == (ids, labels)


def test_plain_text_trains_on_every_token(tok):
    task, (f,), _ = _encode(tok, [{"text": "the red fox"}])
    assert task.meta["format"] == "text" and task.meta["mode"] == "text"
    assert f["labels"] == f["input_ids"] == tok("the red fox")["input_ids"] + [tok.eos_token_id]


def test_format_flag_overrides_detection(tok):
    rows = [{"text": "plain", "prompt": "p", "completion": "c"}]
    assert _encode(tok, rows)[0].meta["format"] == "prompt-completion"
    assert _encode(tok, rows, {"format": "text"})[0].meta["format"] == "text"
    with pytest.raises(CliError, match="needs a list-of-turns column"):
        _encode(tok, rows, {"format": "messages"})


def test_template_that_drops_assistant_text_is_refused_naming_the_row(tok):
    from transformers import AutoTokenizer

    from unipeft.cli.embedded import embedded_path

    t = AutoTokenizer.from_pretrained(str(embedded_path()))
    # a reasoning template: it keeps only what follows </think> in assistant turns
    t.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + "
                       "(m['content'].split('</think>')[-1] if m['role'] == 'assistant' else m['content']) + "
                       "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                       "{% endif %}")
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>4"}]}
    _encode(t, [ok])
    with pytest.raises(CliError) as e:
        _encode(t, [ok, bad])
    assert "data.jsonl row 2" in e.value.problem and "dropped or changed the text of assistant turn 2" in e.value.problem


def test_truncation_keeps_labels_aligned(tok):
    _, (full,), _ = _encode(tok, [{"messages": SYSTEM_CHAT}])
    first = next(i for i, y in enumerate(full["labels"]) if y != -100)
    for L in (5, 20, 24, len(full["input_ids"]) - 1):
        _, (f,), truncated = _encode(tok, [{"messages": SYSTEM_CHAT}], max_length=L)
        assert truncated == 1
        # the head, unless it holds no trained token: then L//2 tokens of context before the first trained one
        s = 0 if first < L else first - L // 2
        assert f["input_ids"] == full["input_ids"][s:s + L] and f["labels"] == full["labels"][s:s + L]
        assert any(y != -100 for y in f["labels"])  # a row with nothing to learn would give a NaN (0/0) loss


def test_truncation_of_a_long_prompt_keeps_the_response(tok):
    rows = [{"prompt": "word " * 80, "completion": "the answer"}]
    _, (f,), truncated = _encode(tok, rows, max_length=16)
    assert truncated == 1 and len(f["input_ids"]) == 16
    trained = tok.decode([i for i, y in zip(f["input_ids"], f["labels"]) if y != -100])
    assert trained.startswith("the answer")
    _, (whole,), _ = _encode(tok, rows)
    first = next(i for i, y in enumerate(whole["labels"]) if y != -100)
    s = min(first - 8, len(whole["input_ids"]) - 16)  # L//2 tokens of context, or the row's last L tokens
    assert (f["input_ids"], f["labels"]) == (whole["input_ids"][s:s + 16], whole["labels"][s:s + 16])  # aligned


def test_no_chat_template_needs_one_for_turns(tok):
    from transformers import AutoTokenizer

    from unipeft.cli.embedded import embedded_path

    t = AutoTokenizer.from_pretrained(str(embedded_path()))
    t.chat_template = None
    with pytest.raises(CliError) as e:
        _encode(t, [{"messages": SYSTEM_CHAT}])
    assert "no chat template" in e.value.problem and "--chat-template chatml" in e.value.fix
    task, (f,), _ = _encode(t, [{"messages": SYSTEM_CHAT}], {"chat_template": "chatml"})
    assert (f["input_ids"], f["labels"]) == _expected(tok, EXPECTED)  # the built-in ChatML: SmolLM2's layout
    assert task.meta["chat_template"]  # kept with the adapter
    # Alpaca rows without a template: the "### Instruction" layout, loss on the response and EOS
    _, (f,), _ = _encode(t, [{"instruction": "Name it.", "output": "Paris."}])
    trained = tok.decode([i for i, y in zip(f["input_ids"], f["labels"]) if y != -100])
    assert trained == "Paris.<|im_end|>"  # SmolLM2's EOS


@pytest.mark.parametrize("row,phrase", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}, "has role 'robot'"),
    ({"conversations": [{"from": "alien", "value": "Hi"}, {"from": "gpt", "value": "x"}]}, "not a ShareGPT speaker"),
])
def test_bad_turns_name_the_row(tok, row, phrase):
    rows = [row]
    if "conversations" in row:  # detection needs from/value keys; an unknown speaker is then the error
        with pytest.raises(CliError, match=phrase):
            _encode(tok, rows)
        return
    with pytest.raises(CliError) as e:
        _encode(tok, rows, {"format": "messages"})
    assert phrase in e.value.problem and "row 1" in e.value.problem


def test_adapter_meta_from_before_the_formats_still_encodes(tok):
    """unipeft_task.json of an older instruction run has no "format": its rows were Alpaca rows."""
    old = {"mode": "instruction", "text_columns": ["instruction", "input"], "label_column": "output",
           "columns": ["instruction", "output"], "chat": True}
    row = {"instruction": "Name the capital.", "input": "France", "output": "Paris."}
    (f,), _ = CausalLM(tok, 256, old).encode([row], "eval.jsonl")
    (g,), _ = CausalLM.from_data(tok, 256, [row], "eval.jsonl", {}).encode([row], "eval.jsonl")
    assert (f["input_ids"], f["labels"]) == (g["input_ids"], g["labels"])


def test_conversational_prompt_completion_without_a_template_is_refused(tok):
    """TRL's conversational prompt/completion (lists of turns) has no plain layout: without a chat template the
    system/earlier turns would be dropped (only the first turn's text was kept as the prompt)."""
    from transformers import AutoTokenizer

    from unipeft.cli.embedded import embedded_path

    t = AutoTokenizer.from_pretrained(str(embedded_path()))
    t.chat_template = None
    rows = [{"prompt": SYSTEM_CHAT[:4], "completion": SYSTEM_CHAT[4:]}]
    with pytest.raises(CliError) as e:
        _encode(t, rows)
    assert "no chat template" in e.value.problem and "--chat-template chatml" in e.value.fix
    _, (f,), _ = _encode(t, rows, {"chat_template": "chatml"})
    assert (f["input_ids"], f["labels"]) == _expected(tok, EXPECTED)  # with a template: every turn, rendered
