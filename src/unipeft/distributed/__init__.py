"""Sharded engines (FSDP2, DeepSpeed ZeRO-3) meet the adapter: gathering its parameters to full tensors for
saving and for computing derived tensors, on every rank; which process writes files."""

from .fsdp2 import check_quantized_for_fsdp2, shard_fsdp2
from .gather import assign_full, full_parameters, full_shape, is_main_process, parameters_from, sharding_of
from .zero_optim import load_zero_optimizer_state, zero_optimizer_state

__all__ = ["assign_full", "check_quantized_for_fsdp2", "full_parameters", "full_shape", "is_main_process",
           "load_zero_optimizer_state", "parameters_from", "shard_fsdp2", "sharding_of", "zero_optimizer_state"]
