"""A DeepSpeed ZeRO optimizer's state as whole tensors keyed by parameter name, and back: a ZeRO-3 checkpoint
written on N processes resumes on M (saving works for stages 1-3; loading is ZeRO-3 only, see
load_zero_optimizer_state).

ZeRO (stages 1-3) keeps, per process, its partition of a flat fp32 master copy of the trainable parameters and of
each optimizer state tensor (Adam's exp_avg, exp_avg_sq) for the whole group; its own checkpoint files are those
partitions, so they load only on the same number of processes. DeepSpeed's public per-parameter calls
(`deepspeed.utils.safe_get_full_fp32_param` / `safe_get_full_optimizer_state` and their `safe_set_full_*`
counterparts) gather one parameter's full master weight or state tensor, or write one back into whatever
partitioning the current run has. The format: `state` keyed by parameter name, as in torch.distributed.checkpoint's full
optimizer state dict (what unipeft's CLI writes for DDP and FSDP2); `param_groups`, each group's hyperparameters
(lr, betas, ...; which parameters a group holds is the run's own setup); and `master`, the fp32 master weights
(under bf16/fp16 training they are not the module's weights).

Every call below is a collective under ZeRO (each gather is an all-reduce): call on every process, with the same
parameters in the same order.
"""

from __future__ import annotations

import torch


def _zero_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer (engine.optimizer) in `optimizer`, unwrapping Accelerate's AcceleratedOptimizer."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    found = optimizer
    while not isinstance(found, ZeROOptimizer):
        found = getattr(found, "optimizer", None)
        if found is None:
            raise TypeError(f"{type(optimizer).__name__} is not (and does not wrap) a DeepSpeed ZeRO optimizer; "
                            f"pass the optimizer Accelerate or deepspeed.initialize returned")
    return found


def _state_keys(torch_optimizer) -> tuple[list[str], dict]:
    """(per-element state keys, scalar state values such as Adam's step) of the torch optimizer that ZeRO runs on
    its flat partitions (all flat groups share the scalars: one step for all)."""
    flat, st = next(((f, st) for f, st in torch_optimizer.state.items() if st), (None, None))
    if flat is None:
        raise ValueError("the optimizer has taken no step yet (its state is empty): save after a step")
    per_element = [k for k, v in st.items() if torch.is_tensor(v) and v.dim() and v.shape == flat.shape]
    scalars = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items() if k not in per_element}
    return per_element, scalars


@torch.no_grad()
def zero_optimizer_state(named, optimizer) -> dict:
    """{"state": {name: {key: full tensor}}, "param_groups": [...], "master": {name: fp32 tensor}} for the
    trainable parameters `named` (name, parameter) of a model prepared with DeepSpeed ZeRO; every process gets
    the whole dict (the main process writes it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = _zero_optimizer(optimizer)
    per_element, scalars = _state_keys(zero.optimizer)
    state, master = {}, {}
    for name, p in named:
        master[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        state[name] = {**{k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in per_element},
                       **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()}}
    # each group's hyperparameters (lr, betas, ...); which parameter is in which group is the run's own setup
    groups = [{k: v for k, v in g.items() if k != "params"} for g in zero.optimizer.param_groups]
    return {"state": state, "param_groups": groups, "master": master}


@torch.no_grad()
def load_zero_optimizer_state(named, optimizer, saved: dict) -> None:
    """Write `saved` (zero_optimizer_state's dict, from a run on any number of processes) into the ZeRO optimizer
    of this run: each process keeps its partition of the master weights and state tensors; the hyperparameters
    (lr, betas, ...) of each group are restored. Call it after the optimizer is prepared, before the first step.
    ZeRO-3 only (stages 1-2 are refused, naming why)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    zero = _zero_optimizer(optimizer)
    if not isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        # stages 1-2 map each parameter to its slice of the optimizer state when they link their partitions, before
        # any state exists, and DeepSpeed's public setter then finds no slice to write ('NoneType' is not iterable)
        raise ValueError(f"loading a name-keyed optimizer state into DeepSpeed {type(zero).__name__} (ZeRO stage 1/2) "
                         f"is not supported: it resumes only from its own checkpoint, on the same number of "
                         f"processes. Use ZeRO-3 to resume on another number of processes")
    names = [n for n, _ in named]
    missing = sorted(set(names) - set(saved["state"]) | set(names) - set(saved["master"]))
    extra = sorted(set(saved["state"]) - set(names))
    if missing or extra:
        raise ValueError(f"the saved optimizer state does not fit these parameters: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}; resume with the run's own method and options")
    if len(saved["param_groups"]) != len(zero.optimizer.param_groups):
        raise ValueError(f"the saved optimizer has {len(saved['param_groups'])} parameter group(s), this one "
                         f"{len(zero.optimizer.param_groups)}; resume with the run's own optimizer options")
    from ..compat import zero_fp32_partitions

    # the torch optimizer on the flat partitions creates its state at its first step: create it here (zeros and
    # the saved scalars, such as Adam's step), then fill each parameter's part of it
    like = saved["state"][names[0]]
    for flat in zero_fp32_partitions(zero):
        zero.optimizer.state[flat] = {k: (torch.zeros_like(flat) if torch.is_tensor(v) and v.dim() else
                                          (v.clone() if torch.is_tensor(v) else v)) for k, v in like.items()}
    for g, hyper in zip(zero.optimizer.param_groups, saved["param_groups"]):
        g.update({k: v for k, v in hyper.items() if k != "params"})
    for name, p in named:
        safe_set_full_fp32_param(p, saved["master"][name].to(torch.float32))
        for k, v in saved["state"][name].items():
            if torch.is_tensor(v) and v.dim():
                safe_set_full_optimizer_state(p, v.to(torch.float32), k)
