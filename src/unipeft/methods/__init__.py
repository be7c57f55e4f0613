"""Named points in the design space: one small self-registering file per method."""

from .adapter import AdapterConfig
from .ia3 import IA3Config
from .lora import LoraConfig

__all__ = ["LoraConfig", "IA3Config", "AdapterConfig"]
