"""AutoPeftModel*: load the base model named in adapter_config.json with transformers' Auto class for the
task, then the adapter on it (HF PEFT's AutoPeftModel API)."""

from __future__ import annotations

from pathlib import Path

from .config import PeftConfig, TaskType
from .peft_model import PeftModel

# task type -> transformers Auto class that builds the base with the right head
AUTO_CLASS = {TaskType.CAUSAL_LM: "AutoModelForCausalLM", TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
              TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM", TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
              TaskType.QUESTION_ANS: "AutoModelForQuestionAnswering", TaskType.FEATURE_EXTRACTION: "AutoModel"}


def _base_class(cls, cfg: PeftConfig, base_path: str):
    import transformers

    task = cfg.task_type
    if cls._task is not None:
        if task is not None and task != cls._task:
            raise ValueError(f"the adapter's task_type is {task.value}, so load it with "
                             f"AutoPeftModel{_SUFFIX[task]} rather than {cls.__name__}")
        return getattr(transformers, AUTO_CLASS[cls._task])
    if task is not None:
        return getattr(transformers, AUTO_CLASS[task])
    mapping = cfg.auto_mapping or {}
    if mapping.get("base_model_class"):  # written by save_pretrained when task_type is None
        lib = str(mapping.get("parent_library", ""))
        if lib != "transformers" and not lib.startswith("transformers."):
            raise ValueError(f"the adapter's auto_mapping names a class from {lib!r}; AutoPeftModel builds "
                             f"transformers classes only — build the base yourself and use PeftModel.from_pretrained")
        return getattr(transformers, mapping["base_model_class"])
    arch = (transformers.AutoConfig.from_pretrained(base_path).architectures or [None])[0]
    if arch is None or not hasattr(transformers, arch):
        raise ValueError("the adapter has no task_type and no auto_mapping, and the base model's config names no "
                         "architecture: use a task class such as AutoPeftModelForCausalLM")
    return getattr(transformers, arch)


class AutoPeftModel:
    """`AutoPeftModel.from_pretrained(adapter)`: base model from `base_model_name_or_path`, then the adapter.
    The base's class comes from the adapter's task_type (HF PEFT's AutoPeftModel refuses a task_type and asks
    for the task's class; here it is simply used), else from `auto_mapping`, else from the base's config."""

    _task: TaskType | None = None

    def __init__(self, *args, **kwargs):
        raise EnvironmentError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, adapter_name: str = "default", is_trainable: bool = False,
                        config: PeftConfig | None = None, revision: str | None = None, **kwargs) -> PeftModel:
        """`kwargs` go to the base model's from_pretrained (torch_dtype, device_map, ...)."""
        cfg = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        base_path = cfg.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{pretrained_model_name_or_path}: adapter_config.json has no base_model_name_or_path, so "
                             f"the base model is unknown; load it yourself and call PeftModel.from_pretrained")
        base = _base_class(cls, cfg, base_path).from_pretrained(base_path, revision=cfg.revision, **kwargs)
        _grow_embeddings(base, pretrained_model_name_or_path)
        return PeftModel.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                         is_trainable=is_trainable, config=config, revision=revision)


def _grow_embeddings(base, adapter_path) -> None:
    """A tokenizer saved with the adapter that has more tokens than the base's embedding table (tokens added
    for fine-tuning): the table is resized to it, as HF PEFT does."""
    if not (Path(adapter_path) / "tokenizer_config.json").is_file() or not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(adapter_path))
    if n > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(n)


_SUFFIX = {TaskType.CAUSAL_LM: "ForCausalLM", TaskType.SEQ_CLS: "ForSequenceClassification",
           TaskType.SEQ_2_SEQ_LM: "ForSeq2SeqLM", TaskType.TOKEN_CLS: "ForTokenClassification",
           TaskType.QUESTION_ANS: "ForQuestionAnswering", TaskType.FEATURE_EXTRACTION: "ForFeatureExtraction"}


class AutoPeftModelForCausalLM(AutoPeftModel):
    _task = TaskType.CAUSAL_LM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    _task = TaskType.SEQ_CLS


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    _task = TaskType.SEQ_2_SEQ_LM


class AutoPeftModelForTokenClassification(AutoPeftModel):
    _task = TaskType.TOKEN_CLS


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    _task = TaskType.QUESTION_ANS


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    _task = TaskType.FEATURE_EXTRACTION
