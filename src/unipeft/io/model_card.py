"""README.md model card that save_pretrained writes beside the adapter.

The YAML header is what the hub reads: `library_name: peft` for methods whose files are HF PEFT's format (the
hub's "use this model" snippet, peft.PeftModel.from_pretrained, loads them), `library_name: unipeft` for
unipeft's own methods, which HF PEFT cannot load. A README.md the user wrote is never touched; a card this
module wrote (it carries MARKER) is rewritten on the next save.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .atomic import write_text

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
MARKER = "<!-- written by unipeft's save_pretrained; delete this line and later saves keep your edits -->"

_AUTO = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
         "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
         "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def _hub_id(name) -> str | None:
    """The base model as a hub id, or None for a local folder (the hub's base_model field must be an id)."""
    if not name or Path(name).exists() or str(name).startswith((".", "/", "~")) or str(name).count("/") > 1:
        return None
    return str(name)


def render_model_card(config: dict, hf_format: bool) -> str:
    peft_type, task, base = config.get("peft_type"), config.get("task_type"), config.get("base_model_name_or_path")
    hub_base = _hub_id(base)
    lib = "peft" if hf_format else "unipeft"
    head = ["---"]
    if hub_base:
        head.append(f"base_model: {json.dumps(hub_base)}")
    head.append(f"library_name: {lib}")
    head += ["tags:", "- unipeft", f"- {str(peft_type).lower()}"]
    if hub_base:
        head.append(f"- {json.dumps('base_model:adapter:' + hub_base)}")
    head.append("---")
    auto = _AUTO.get(task) if task else None
    loader = "peft" if hf_format else "unipeft"
    body = [MARKER, "", f"# {peft_type} adapter" + (f" for {base}" if base else ""), "",
            f"- **Method:** `{peft_type}`" + (f", task `{task}`" if task else ""),
            f"- **Base model:** `{base}`" if base else "- **Base model:** not recorded",
            "- **Written by:** unipeft, in HF PEFT's file format (HF PEFT loads it too)" if hf_format
            else "- **Written by:** unipeft; this method is unipeft's own, so load it with unipeft",
            "", "## Load", "", "```python"]
    if auto:
        body += [f"from transformers import {auto}", f"from {loader} import PeftModel", "",
                 f"base = {auto}.from_pretrained({json.dumps(base or '<base model>')})",
                 'model = PeftModel.from_pretrained(base, "<this folder or repo id>")']
    else:
        body += [f"from {loader} import PeftModel", "",
                 'model = PeftModel.from_pretrained(base_model, "<this folder or repo id>")']
    body += ["```", ""]
    return "\n".join(head + body)


def write_model_card(folder, config: dict, hf_format: bool) -> None:
    path = Path(folder) / CARD_NAME
    if path.exists() and MARKER not in path.read_text(errors="replace"):
        logger.info("keeping the existing %s (not written by unipeft)", path)
        return
    write_text(path, render_model_card(config, hf_format))
