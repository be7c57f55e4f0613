"""Sharded engines (FSDP2, DeepSpeed ZeRO-3) meet the adapter: gathering its parameters to full tensors for
saving and for computing derived tensors, on every rank; which process writes files."""

from .gather import full_parameters, is_main_process, parameters_from, sharding_of

__all__ = ["full_parameters", "is_main_process", "parameters_from", "sharding_of"]
