"""get_peft_config(dict): HF PEFT's way of building a config from a plain dictionary."""

from __future__ import annotations

from typing import Any

from .config import PeftConfig
from .registry import config_class


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config of `config_dict["peft_type"]` built from the other keys. As in HF PEFT every key must be a
    field of that config (a typo is an error, not a silently ignored option); HF PEFT fields that unipeft lacks
    (the config's `unsupported`) are accepted at their default values."""
    if not isinstance(config_dict, dict) or "peft_type" not in config_dict:
        raise ValueError('get_peft_config needs a dict with a "peft_type" key, e.g. {"peft_type": "LORA", "r": 8}')
    cls = config_class(str(config_dict["peft_type"]))
    cls.check_unsupported(config_dict)  # HF PEFT fields unipeft lacks: accepted at their defaults only
    kwargs = {k: v for k, v in config_dict.items() if k != "peft_type" and k not in cls.unsupported}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise TypeError(f"get_peft_config: {e} (the fields of {cls.__name__} are "
                        f"{sorted(f for f in cls.__dataclass_fields__)})") from None
