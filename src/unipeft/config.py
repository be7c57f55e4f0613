"""PeftConfig: the typed, frozen base of every method config, with HF PEFT's field names and JSON form."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Union

from .io.config_file import load_config, save_config

logger = logging.getLogger(__name__)


class TaskType(str, Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    QUESTION_ANS = "QUESTION_ANS"

    def __str__(self) -> str:
        return self.value


# Task heads trained in full and saved with the adapter, as HF PEFT does for these task types.
TASK_HEADS = {TaskType.SEQ_CLS: ("classifier", "score"), TaskType.TOKEN_CLS: ("classifier", "score"),
              TaskType.QUESTION_ANS: ("qa_outputs",)}


def _freeze(v):
    if isinstance(v, (list, set)):
        return tuple(v)
    return v


@dataclass(frozen=True, kw_only=True)
class PeftConfig:
    """Fields shared by every method. Subclasses set `peft_type` and build their insertions."""

    peft_type: ClassVar[str] = ""
    hf_format: ClassVar[bool] = False  # files follow HF PEFT's key names, so HF PEFT loads them
    key_prefix: ClassVar[str] = "base_model.model."  # HF PEFT's prefix for this kind of adapter
    # keys of foreign (HF PEFT) files that change the meaning of an adapter when not at these values
    unsupported: ClassVar[dict[str, Any]] = {}
    is_prompt_learning: ClassVar[bool] = False  # HF PEFT's flag (read by transformers.Trainer)

    task_type: Union[TaskType, str, None] = None
    base_model_name_or_path: Union[str, None] = None
    revision: Union[str, None] = None
    inference_mode: bool = False
    modules_to_save: Union[tuple[str, ...], None] = None
    # HF PEFT's bookkeeping fields: accepted and written back, they change nothing here
    auto_mapping: Union[dict, None] = None  # {"base_model_class", "parent_library"} when task_type is None
    peft_version: Union[str, None] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))
        if self.task_type is not None:
            try:
                object.__setattr__(self, "task_type", TaskType(str(self.task_type).upper().replace("-", "_")))
            except ValueError:
                raise ValueError(f"unknown task_type {self.task_type!r}; choose one of "
                                 f"{[t.value for t in TaskType]}") from None
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for invalid values (subclasses extend)."""

    # -- what the method is -------------------------------------------------------------------------
    def resolved(self, model, arch) -> "PeftConfig":
        """A copy with defaults that depend on the model filled in (target modules, sizes, heads)."""
        heads = TASK_HEADS.get(self.task_type, ())
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        extra = tuple(h for h in heads if h in names and h not in (self.modules_to_save or ()))
        if extra:
            return dataclasses.replace(self, modules_to_save=tuple(self.modules_to_save or ()) + extra)
        return self

    def insertions(self, model, arch) -> tuple:
        raise NotImplementedError

    trainable_biases: ClassVar[str] = "none"

    def initialize(self, model, handle) -> None:
        """Data-dependent initialisation after injection (e.g. from the activations of real tokens)."""

    def bias_mode(self) -> str:
        return self.trainable_biases

    # -- files (HF PEFT's API; unipeft.io.config_file does the work) ----------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs) -> "PeftConfig":
        """The config in `<folder>/adapter_config.json`, as its own method's class. On a method's class
        (LoraConfig.from_pretrained) a file of another method is refused. Config fields in kwargs override."""
        return load_config(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write `<save_directory>/adapter_config.json`."""
        save_config(self, save_directory, **kwargs)

    # -- JSON --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else (v.value if isinstance(v, Enum) else v)
        return d

    @classmethod
    def check_unsupported(cls, d: dict) -> None:
        """HF PEFT keys unipeft lacks are fine at their defaults; any other value would change the method."""
        for k, default in cls.unsupported.items():
            # an empty list/dict is "not set" (HF PEFT writes target_parameters=[] for Mixtral)
            if k in d and d[k] not in (default, None) and not (isinstance(d[k], (list, dict)) and not d[k]):
                raise ValueError(f"this {cls.peft_type} adapter sets {k}={d[k]!r}, which unipeft does not support")

    @classmethod
    def from_dict(cls, d: dict) -> "PeftConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        cls.check_unsupported(d)
        dropped = sorted(k for k in d if k not in known and k != "peft_type")
        if dropped:
            logger.debug("ignoring adapter_config keys unipeft does not use: %s", dropped)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class PromptLearningConfig(PeftConfig):
    """HF PEFT's prompt-learning fields; the shape fields are re-derived from the model when null."""

    key_prefix: ClassVar[str] = "base_model."
    hf_format: ClassVar[bool] = True
    is_prompt_learning: ClassVar[bool] = True

    num_virtual_tokens: int = 20
    token_dim: Union[int, None] = None
    num_transformer_submodules: Union[int, None] = None
    num_attention_heads: Union[int, None] = None
    num_layers: Union[int, None] = None

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")

    def resolved(self, model, arch):
        cfg = super().resolved(model, arch)
        mc = model.config
        enc_dec = bool(getattr(mc, "is_encoder_decoder", False))
        return dataclasses.replace(
            cfg, token_dim=cfg.token_dim or getattr(mc, "hidden_size", None) or mc.d_model,
            num_transformer_submodules=cfg.num_transformer_submodules or (2 if enc_dec else 1),
            num_attention_heads=cfg.num_attention_heads or mc.num_attention_heads,
            num_layers=cfg.num_layers or getattr(mc, "num_hidden_layers", None) or mc.num_layers)


def init_text_ids(text: str, tokenizer_name_or_path, length: int, tokenizer_kwargs=None) -> tuple[int, ...]:
    """HF PEFT's prompt-tuning TEXT init: the text's token ids with the tokenizer's special tokens, cut to
    `length` when longer and repeated to fill it when shorter."""
    if not tokenizer_name_or_path:
        raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer folder or hub id) to "
                         "turn the text into tokens")
    from transformers import AutoTokenizer

    kw = {k: v for k, v in (tokenizer_kwargs or {}).items() if k != "trust_remote_code"}  # a file must not run code
    ids = list(AutoTokenizer.from_pretrained(tokenizer_name_or_path, **kw)(text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {text!r} has no tokens")
    return tuple((ids * -(-length // len(ids)))[:length])


def tokenize_init_text(text: str, tokenizer_name_or_path, limit: int, what: str) -> tuple[int, ...]:
    """Token ids of an init text; it must fit in `limit` virtual tokens."""
    if not tokenizer_name_or_path:
        raise ValueError(f"{what} needs tokenizer_name_or_path (a tokenizer folder or hub id) to turn the text into tokens")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    ids = tuple(tok(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"{what}: the init text {text!r} has no tokens")
    if len(ids) > limit:
        raise ValueError(f"{what}: the init text is {len(ids)} tokens long but num_virtual_tokens is {limit}; "
                         f"shorten the text or raise num_virtual_tokens")
    return ids
