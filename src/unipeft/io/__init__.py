"""Checkpoints: adapter_config.json + adapter_model.safetensors, HF PEFT's layout; atomic writes."""

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_config_dict, load_tensors, save_adapter, weights_file

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_config_dict", "load_tensors", "save_adapter"]
