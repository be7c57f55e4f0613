"""The facade HF PEFT users know: get_peft_model, PeftModel(.from_pretrained/.save_pretrained/...)."""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
from torch import nn

from .arch import find_arch
from .training.checkpointing import enable_gradient_checkpointing
from .config import PeftConfig, TaskType
from .deltas.base import delta_parameters
from .distributed import assign_full, full_parameters, full_shape, parameters_from
from .distributed import is_main_process as dist_main
from .handle import Handle
from .inject import inject
from .integrations import compat
from .integrations.trl import check_fused_lm_head
from .io import load_config_dict, load_tensors, save_adapter, weights_file
from .io.checkpoint import resolve_folder
from .io.hub import push_adapter
from .io.keys import clashing_exports, exported, file_keys, hf_base_copies, hf_wrapper_prefixes
from .io.model_card import write_model_card
from .training.losses import ChunkedLoss
from .training.recompute import ActivationRecompute
from .mixed_batch import batch_size, mixed_batch
from .positions.layout import check_adapter_name
from .registry import config_class
from .weighted import add_weighted_adapter

logger = logging.getLogger(__name__)


class TunerModel(nn.Module):
    """Holds the adapted model as `.model`, so state-dict keys read `base_model.model.*` as in HF PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model with one or more named adapters injected, one of them active. Forward, generate and everything
    else pass to the model."""

    _disabled = False  # inside disable_adapter()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", *,
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        check_adapter_name(adapter_name)
        self.base_model = TunerModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        object.__setattr__(self, "_handles", {})  # adapter name -> Handle; plain attribute: not a submodule
        self._inject(adapter_name, peft_config, autocast_adapter_dtype)
        compat.register(PeftModel)  # transformers.Trainer, accelerate and TRL now treat us as a PEFT model

    # pass-through --------------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_handle", "_handles"):
                raise
            if name in _TRANSFORMERS_PEFT_NAMES:  # the base model's own PEFT mixin must not answer for us
                raise AttributeError(
                    f"unipeft's PeftModel has no {name!r}; transformers' PEFT integration on the base model would "
                    f"answer it for the wrong model. Adapters are managed here with add_adapter, load_adapter, "
                    f"set_adapter, delete_adapter, active_adapters and disable_adapter()") from None
            return getattr(self.base_model.model, name)

    def forward(self, *args, adapter_names=None, **kwargs):
        if kwargs.get("fused_lm_head"):
            check_fused_lm_head(self)
        if adapter_names is not None:
            with self._mixed(adapter_names, args, kwargs):
                return self.base_model.model(*args, **kwargs)
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        if adapter_names is not None:
            if kwargs.get("num_beams", 1) > 1 or kwargs.get("num_return_sequences", 1) > 1:
                raise ValueError("adapter_names with num_beams or num_return_sequences > 1 is not supported (rows "
                                 "are multiplied during generation); generate each adapter's rows separately")
            with self._mixed(adapter_names, args, kwargs):
                return self.base_model.model.generate(*args, **kwargs)
        return self.base_model.model.generate(*args, **kwargs)

    def _mixed(self, adapter_names, args, kwargs):
        """A mixed-adapter batch: one adapter name (or "__base__") per row (see unipeft.mixed_batch). Inside
        disable_adapter() every row sees the base model, as in HF PEFT."""
        if self._disabled:
            return contextlib.nullcontext()
        if torch.is_grad_enabled() and getattr(self.get_base_model(), "is_gradient_checkpointing", False):
            raise ValueError("adapter_names with gradient checkpointing: the recomputation in backward would run "
                             "without the batch's per-row adapters; train a mixed batch without checkpointing, or "
                             "one adapter at a time")
        return mixed_batch(self._handles, adapter_names, batch_size(args, kwargs), next(self.parameters()).device)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def handle(self) -> Handle:
        return self._handle

    @property
    def _handle(self) -> Handle:
        return self._handles[self.active_adapter]

    def _reload_adapter(self, folder, adapter_name: str, allow_pickle: bool = False) -> None:
        """Reload the weights of an adapter already here from a folder written by save_pretrained (what Trainer
        does to resume and for load_best_model_at_end). The folder's config must be this adapter's: same shapes
        with another lora_alpha would load without error and compute something else."""
        d = load_config_dict(folder)
        varying = ("inference_mode", "base_model_name_or_path", "revision", "auto_mapping")
        a = {k: v for k, v in self.peft_config[adapter_name].to_dict().items() if k not in varying}
        b = {k: v for k, v in config_class(d["peft_type"]).from_dict(d).to_dict().items() if k not in varying}
        if a != b:  # save_pretrained writes the resolved config, so a folder of this adapter matches as it is
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(f"{folder} holds a different adapter than {adapter_name!r} (differs in {diff}); "
                             f"load it under another adapter_name, or into a fresh base model with "
                             f"PeftModel.from_pretrained")
        # As in HF PEFT, reloading an existing adapter changes its weights only, not what is trainable.
        self.load_adapter_weights(load_tensors(folder, allow_pickle=allow_pickle), source=str(weights_file(folder)),
                                  adapter_name=adapter_name)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, offload_activations: bool = False):
        """Non-reentrant checkpointing (adapter gradients flow though the frozen inputs need none); with
        `offload_activations` the checkpointed layer inputs wait in host memory (see unipeft.training.checkpointing)."""
        enable_gradient_checkpointing(self.base_model.model, offload=offload_activations,
                                      checkpoint_kwargs=gradient_checkpointing_kwargs)

    # parameters ----------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        held = sum(m.frozen_buffer_weights() for m in self.modules() if hasattr(m, "frozen_buffer_weights"))
        return sum(_n_weights(p) for p in params if p.requires_grad), sum(_n_weights(p) for p in params) + held

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")

    # adapter on/off, merge -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self):
        was_merged = self._handle.merged
        if was_merged:
            self._handle.unmerge()
        self._handle.set_enabled(False)
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            self._handle.set_enabled(True)
            if was_merged:
                self._handle.merge()

    def merge_adapter(self) -> None:
        self._handle.merge()

    def unmerge_adapter(self) -> None:
        self._handle.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapter into the weights, drop the others, and return the plain model (trained task
        heads of the active adapter kept)."""
        self._remove_inactive()
        return self._handle.unload(merge=True)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model exactly as it was before get_peft_model."""
        self._remove_inactive()
        return self._handle.remove()

    # several adapters (HF PEFT's multi-adapter API) ---------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def _inject(self, adapter_name: str, peft_config: PeftConfig, autocast_adapter_dtype: bool = True) -> Handle:
        """Inject one more adapter, inactive unless it is the first; the other adapters' trainability is kept."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first or "
                             f"choose another name")
        model = self.base_model.model
        arch = find_arch(model)
        cfg = peft_config.resolved(model, arch)
        others = list(self._handles.values())
        # trained biases are base parameters every adapter computes with: stricter than HF PEFT, a model with
        # several adapters has none that trains them
        if others and (cfg.bias_mode() != "none" or any(h.trainable_base for h in others)):
            raise ValueError("only one adapter of a model may train the base model's biases (bias='all' or "
                             "'lora_only'), since every adapter shares them; use bias='none' for the others")
        grads = {id(p): p.requires_grad for p in model.parameters()}
        enabled = [(h, h.switch.on) for h in others]
        for h in others:  # a new adapter is built (and data-initialised) on the base model alone
            h.set_enabled(False)
        try:
            handle = inject(model, cfg.insertions(model, arch), arch=arch, modules_to_save=cfg.modules_to_save or (),
                            trainable_biases=cfg.bias_mode(), adapter_name=adapter_name,
                            autocast_adapter_dtype=autocast_adapter_dtype)
            try:
                cfg.initialize(model, handle)
                _check_shared_base(handle, adapter_name, others, list(self._handles))
            except Exception:
                handle.remove()
                raise
        finally:
            for h, on in enabled:
                h.set_enabled(on)
        self._handles[adapter_name] = handle
        self.peft_config[adapter_name] = cfg
        if others:  # not active, not trainable (HF PEFT); the active adapter keeps its head and its gradients
            handle.set_enabled(False)
            self._handle.set_enabled(self._handle.switch.on)
            own = {id(p) for p in handle.adapter_parameters().values()}
            for p in model.parameters():
                p.requires_grad_(grads.get(id(p), False) and id(p) not in own)
        return handle

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new, untrained adapter; it is not active (set_adapter activates it)."""
        self._inject(adapter_name, peft_config, autocast_adapter_dtype)

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, torch_device=None,
                     autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                     low_cpu_mem_usage: bool = False, subfolder: str | None = None, allow_pickle: bool = False,
                     revision: str | None = None, **_) -> None:
        """Load a saved adapter (a folder written by save_pretrained, ours or HF PEFT's) as `adapter_name`,
        beside the adapters already here; it is not active (set_adapter activates it). The name of an adapter
        already here reloads its weights (as Trainer does on resume and for load_best_model_at_end)."""
        folder = resolve_folder(model_id, revision=revision)
        if subfolder:
            folder = resolve_folder(folder / subfolder)
        if adapter_name in self.peft_config:
            return self._reload_adapter(folder, adapter_name, allow_pickle=allow_pickle)
        d = load_config_dict(folder)
        config = config_class(d["peft_type"]).from_dict(d)
        tensors = load_tensors(folder, allow_pickle=allow_pickle)
        grads = {id(p): p.requires_grad for p in self.parameters()}
        handle = self._inject(adapter_name, config, autocast_adapter_dtype)
        try:
            self.load_adapter_weights(tensors, source=str(weights_file(folder)), adapter_name=adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        own = {id(p) for p in handle.adapter_parameters().values()}
        for p in self.parameters():  # loading may have re-marked trainables; restore, the new adapter frozen
            p.requires_grad_(grads.get(id(p), False) and id(p) not in own)
        if not is_trainable:
            self.eval()
        if torch_device is not None:
            self.to(torch_device)

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make `adapter_name` the one adapter that acts, and trainable unless `inference_mode` (HF PEFT)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} not found; this model has {list(self.peft_config)}")
        if self._handle.merged:
            logger.warning("adapter %r is merged; unmerging it before switching to %r", self.active_adapter, adapter_name)
            self._handle.unmerge()
        for h in self._handles.values():
            h.set_enabled(False)
        self.active_adapter = adapter_name
        self._handle.set_enabled(True)
        self._handle.mark_trainable()  # freezes every other adapter
        if inference_mode:
            for p in self._handle.adapter_parameters().values():
                p.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its parameters; deleting the active one activates the first remaining."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; this model has {list(self.peft_config)}")
        if len(self._handles) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; use unload() to get the base model back")
        if adapter_name == self.active_adapter:
            self.set_adapter(next(n for n in self._handles if n != adapter_name))
        grads = {id(p): p.requires_grad for p in self.parameters()}
        handle = self._handles.pop(adapter_name)
        del self.peft_config[adapter_name]
        handle.remove()
        model = self.base_model.model
        if ChunkedLoss.applies_to(model):  # the model-wide loss hook left with the adapter that installed it
            self._handle.extras.append(ChunkedLoss(model))
        if ActivationRecompute.applies_to(model):
            self._handle.extras.append(ActivationRecompute(model))
        for p in self.parameters():
            p.requires_grad_(grads.get(id(p), False))

    def _remove_inactive(self) -> None:
        for name in [n for n in self._handles if n != self.active_adapter]:
            self._handles.pop(name).remove()
            del self.peft_config[name]

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None, **_) -> None:
        """A new LoRA adapter combining `adapters` with `weights` (HF PEFT's linear, cat and svd; see
        unipeft.weighted). It is not active; set_adapter activates it."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank=svd_rank,
                             svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)

    # checkpoints -------------------------------------------------------------------------------------------
    def _config(self, adapter: str | None = None):
        return self.peft_config[adapter or self.active_adapter]

    def _file_keys(self, adapter: str | None = None):
        cfg = self._config(adapter)
        return file_keys(self._handles[adapter or self.active_adapter], hf_names=cfg.hf_format, prefix=cfg.key_prefix)

    def _exports(self, adapter: str | None = None):
        return exported(self._handles[adapter or self.active_adapter]) if self._config(adapter).hf_format else {}

    def adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
        """What save_pretrained writes for one adapter (the active one by default): our weights under HF PEFT's
        names, plus HF's derived tensors, always full tensors. Under FSDP2 / ZeRO-3 it gathers them, a collective
        (call it on every rank); with `state_dict` (the model's full state dict) the values come from there."""
        owned = [p for _, p in self._file_keys(adapter_name).values()]
        owned += [p for d in self._exports(adapter_name).values() for _, p in delta_parameters(d)]
        gathered = full_parameters(self, owned) if state_dict is None else parameters_from(self, owned, state_dict)
        with gathered:  # unsharded and no state_dict: a no-op
            sd = {k: p.detach().clone() for k, (_, p) in self._file_keys(adapter_name).items()}
            for name, delta in self._exports(adapter_name).items():
                with torch.no_grad():
                    sd[name] = delta.hf_tensors()[name].detach().clone()
        return sd

    def save_pretrained(self, save_directory, safe_serialization: bool = True, selected_adapters=None,
                        path_initial_model_for_weight_conversion=None, is_main_process: bool | None = None,
                        state_dict: dict | None = None, **_) -> None:
        """Every adapter (or `selected_adapters`) in HF PEFT's layout: "default" in `save_directory`, any other
        in `save_directory/<adapter name>/`; each folder holds adapter_config.json + adapter_model.safetensors
        (adapter_model.bin with safe_serialization=False). `save_directory` also gets a README.md model card
        (HF PEFT's loads the folder only in its format, and when no derived table is claimed twice), unless it
        has one of the user's.

        Under a sharded engine (FSDP2, DeepSpeed ZeRO-3) call it on every rank: the adapter's tensors are gathered
        (a collective) and only the main process (`is_main_process`; default: the first process of each node,
        unipeft.distributed.is_main_process) writes. Unsharded models run no collective, so saving from rank 0 alone works too.
        `state_dict` (the model's full state dict, as transformers.Trainer passes under DeepSpeed) supplies the
        values instead, with no collective."""
        main = dist_main() if is_main_process is None else bool(is_main_process)
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters names unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        for name in names:
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            self._save_one(folder, name, safe_serialization, path_initial_model_for_weight_conversion, main, state_dict)
        # one model card, at the top (as HF PEFT), describing the first adapter saved
        first = names[0] if names else None
        if first is not None and main:
            write_model_card(save_directory, self._card_config(first), hf_format=self._config(first).hf_format
                             and not clashing_exports(self._handles[first]))

    def _save_one(self, folder, adapter_name: str, safe_serialization: bool = True,
                  path_initial_model_for_weight_conversion=None, main: bool = True, state_dict=None) -> None:
        cfg = self._config(adapter_name).to_dict()
        cfg["inference_mode"] = True
        if cfg.get("base_model_name_or_path") is None:
            cfg["base_model_name_or_path"] = getattr(getattr(self.get_base_model(), "config", None), "name_or_path", None) or None
        if cfg.get("task_type") is None and cfg.get("auto_mapping") is None:  # how AutoPeftModel finds the class
            base = type(self.get_base_model())
            cfg["auto_mapping"] = {"base_model_class": base.__name__, "parent_library": base.__module__}
        tensors = self.adapter_state_dict(adapter_name, state_dict)  # on every rank: may gather sharded tensors
        if not main:
            return
        if path_initial_model_for_weight_conversion is not None:  # PiSSA/OLoRA -> LoRA on the original base
            from .methods.lora_convert import to_plain_lora

            cfg, tensors = to_plain_lora(cfg, tensors, path_initial_model_for_weight_conversion)
        save_adapter(folder, cfg, tensors, safe_serialization=safe_serialization)

    def _card_config(self, adapter_name: str) -> dict:
        cfg = self._config(adapter_name).to_dict()
        if cfg.get("base_model_name_or_path") is None:
            cfg["base_model_name_or_path"] = getattr(getattr(self.get_base_model(), "config", None), "name_or_path", None) or None
        return cfg

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the adapter folder (what save_pretrained writes) to the hub repo `repo_id`, never the base model."""
        return push_adapter(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                        config: PeftConfig | None = None, allow_pickle: bool = False,
                        autocast_adapter_dtype: bool = True, subfolder: str | None = None,
                        revision: str | None = None, **_) -> "PeftModel":
        folder = resolve_folder(model_id, revision=revision)
        if subfolder:  # e.g. a non-default adapter of a multi-adapter save
            folder = resolve_folder(folder / subfolder)
        if config is None:
            d = load_config_dict(folder)
            config = config_class(d["peft_type"]).from_dict(d)
        tensors = load_tensors(folder, allow_pickle=allow_pickle)
        if cls is PeftModel:  # PeftModel.from_pretrained builds the task class, as in HF PEFT
            cls = peft_model_class(config)
        peft = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        try:
            peft.load_adapter_weights(tensors, source=str(weights_file(folder)))
        except Exception:
            peft._handle.remove()  # the user's model is left exactly as it was
            raise
        if not is_trainable:
            for p in peft.parameters():
                p.requires_grad_(False)
            peft.eval()
        return peft

    @torch.no_grad()
    def load_adapter_weights(self, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
                             adapter_name: str | None = None) -> None:
        """Copy a file's tensors into one adapter (the active one by default), refusing any that do not fit."""
        adapter_name = adapter_name or self.active_adapter
        empty = sorted(k for k, v in tensors.items() if v.numel() == 0)
        if empty:  # what a save without gathering writes under ZeRO-3 (HF PEFT/Trainer's known failure)
            raise ValueError(f"{source}: tensor {empty[0]} is empty (shape {tuple(tensors[empty[0]].shape)})"
                             + (f", and {len(empty) - 1} more" if len(empty) > 1 else "") + "; the file was "
                             f"written from sharded parameters that were not gathered (DeepSpeed ZeRO-3 or FSDP). "
                             f"Save again with save_pretrained called on every process")
        skip = hf_wrapper_prefixes(self._handles[adapter_name], self._config(adapter_name).key_prefix)
        tensors = {k: v for k, v in tensors.items() if not (skip and k.startswith(skip))}
        for k, w in hf_base_copies(self._handles[adapter_name], self._config(adapter_name).key_prefix).items():
            t = tensors.pop(k, None)  # HF's copy of an adapted embedding's weight: must be this model's
            if t is not None and (t.shape != w.shape or not torch.equal(t.to(w.device, w.dtype), w)):
                raise ValueError(f"{source} carries its own {k} (shape {tuple(t.shape)}), which differs from this "
                                 f"model's; an adapter with a changed base layer (e.g. a resized vocabulary) is not "
                                 f"supported: resize the base model's embeddings to match before loading")
        exports = self._exports(adapter_name)
        # A file with only HF's derived tensor for a delta (an HF PEFT prompt-learning checkpoint) loads
        # through it; the delta then continues from that tensor.
        for delta in {id(d): d for d in exports.values()}.values():
            own = [k for k, (_, p) in self._file_keys(adapter_name).items() if any(p is q for _, q in delta_parameters(delta))]
            names = [n for n, d in exports.items() if d is delta]
            if not all(k in tensors for k in own) and all(n in tensors for n in names):
                try:
                    delta.load_hf_tensors({n: tensors[n] for n in names})
                except ValueError as e:
                    raise ValueError(f"{source}: {e}") from None
                self._handles[adapter_name].mark_trainable()
                tensors = dict(tensors)  # the delta's weights are now what the file meant
                tensors.update({k: p.detach() for k, (_, p) in self._file_keys(adapter_name).items()
                                if any(p is q for _, q in delta_parameters(delta))})
        keys = self._file_keys(adapter_name)
        tensors = {k: v for k, v in tensors.items() if k not in exports}  # derived: written for HF PEFT only
        unexpected = sorted(set(tensors) - set(keys))
        missing = sorted(set(keys) - set(tensors))
        derived = [k for k in unexpected if k in clashing_exports(self._handles[adapter_name])]
        if derived:
            raise ValueError(f"{source} holds only {derived}, HF PEFT's single derived table, but this model's "
                             f"{self._config(adapter_name).peft_type} is made of several deltas (e.g. separate encoder, decoder and "
                             f"cross-attention prefixes) that one table cannot fill; HF PEFT's layout for this model "
                             f"is not supported")
        if unexpected or missing:
            raise ValueError(
                f"{source} does not fit this model: " + "; ".join(
                    x for x in (f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}" if unexpected else "",
                                f"{len(missing)} missing tensor(s), e.g. {missing[:3]}" if missing else "") if x)
                + ". Is the adapter for another base model, or saved with another config?"
            )
        for k, (path, p) in keys.items():
            got, want = tuple(tensors[k].shape), full_shape(p)
            if got != want:
                partial = len(got) == len(want) and all(g <= w for g, w in zip(got, want))
                raise ValueError(f"{source}: tensor {k} has shape {got} but the model expects {want} at {path}; "
                                 + ("the file holds part of the tensor (one process's shard, saved without "
                                    "gathering: save again with save_pretrained called on every process), or the "
                                    "adapter is for a smaller config" if partial else
                                    "the adapter was made for a different base model or config"))
        for k, (_, p) in keys.items():  # sharded parameters (FSDP2, ZeRO-3) keep their part: call on every rank
            assign_full(p, tensors[k])


# Task classes, as HF PEFT has them: the same model, with forward's named arguments spelled out so that code which
# inspects the signature (Trainer's label names and dataset columns, TRL) sees `labels` and the inputs. Positional
# arguments reach the model in its own order; named arguments left at None are not passed on, so the model's own
# defaults apply.
def _call(peft: PeftModel, positional: tuple, named: dict, kwargs: dict):
    named = {k: v for k, v in named.items() if v is not None}
    if positional:  # the model's own positional order after input_ids, attention_mask
        return PeftModel.forward(peft, named.pop("input_ids", None), named.pop("attention_mask", None), *positional,
                                 **named, **kwargs)
    return PeftModel.forward(peft, **named, **kwargs)  # fused_lm_head check, adapter_names


class _InputsAndLabels(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, *args, inputs_embeds=None, labels=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        return _call(self, args, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                      labels=labels, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=return_dict), kwargs)


class PeftModelForCausalLM(_InputsAndLabels):
    pass


class PeftModelForSequenceClassification(_InputsAndLabels):
    pass


class PeftModelForTokenClassification(_InputsAndLabels):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, *args, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        return _call(self, args, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                      decoder_input_ids=decoder_input_ids,
                                      decoder_attention_mask=decoder_attention_mask,
                                      decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                      return_dict=return_dict), kwargs)


class PeftModelForQuestionAnswering(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, *args, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        return _call(self, args, dict(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids, position_ids=position_ids,
                                      inputs_embeds=inputs_embeds, start_positions=start_positions,
                                      end_positions=end_positions, output_attentions=output_attentions,
                                      output_hidden_states=output_hidden_states, return_dict=return_dict), kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, *args, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        return _call(self, args, dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                      output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                      return_dict=return_dict), kwargs)


TASK_MODEL_CLASSES: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM, TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification, TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering, TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def peft_model_class(peft_config: PeftConfig) -> type[PeftModel]:
    """The PeftModel class HF PEFT would build for this config: by task_type, plain PeftModel without one."""
    return TASK_MODEL_CLASSES.get(peft_config.task_type, PeftModel)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", *,
                   autocast_adapter_dtype: bool = True, **_) -> PeftModel:
    """Inject `peft_config`'s method into `model` (in place) and return the wrapping PeftModel (the task class
    for the config's task_type, as in HF PEFT).

    `autocast_adapter_dtype` (HF PEFT's name): trainable parameters over a bf16/fp16 or quantized base are fp32
    (default) and compute in the activation dtype; False keeps them in the base's dtype."""
    return peft_model_class(peft_config)(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


# public names of transformers' PeftAdapterMixin (on every PreTrainedModel): never answered by the base model
_TRANSFORMERS_PEFT_NAMES = frozenset({"active_adapters", "add_adapter", "delete_adapter", "disable_adapters",
                                      "enable_adapters", "enable_peft_hotswap", "get_adapter_state_dict",
                                      "load_adapter", "set_adapter"})


def _check_shared_base(handle: Handle, name: str, others: list[Handle], other_names: list[str]) -> None:
    """Adapters share the base weights: an init that rewrites them (PiSSA/OLoRA leave W - s·B·A in the host)
    would change what every other adapter computes. HF PEFT rewrites the shared weight silently; we refuse."""
    mine = [s.host_name for s in handle.sites if getattr(s.delta, "changes_host", bool)()]
    theirs = [(n, s.host_name) for n, h in zip(other_names, others) for s in h.sites if getattr(s.delta, "changes_host", bool)()]
    if mine and others:
        raise ValueError(f"adapter {name!r} is initialised from the base weights (PiSSA/OLoRA) and leaves the residual "
                         f"in them ({mine[0]}, ...), which adapter(s) {other_names} also compute with; they would "
                         f"silently change. Make it the first adapter of a fresh model, or save it converted to plain "
                         f"LoRA (save_pretrained(path_initial_model_for_weight_conversion=...)) and load that")
    if theirs:
        raise ValueError(f"adapter {theirs[0][0]!r} (PiSSA/OLoRA) left a residual in the base weights ({theirs[0][1]}, "
                         f"...), so adapter {name!r} would compute on the residual instead of the original weights. "
                         f"Convert {theirs[0][0]!r} to plain LoRA (save_pretrained(path_initial_model_for_weight_"
                         f"conversion=...)) and load that, or use a separate model")


def _n_weights(p: torch.Tensor) -> int:
    """Weights a parameter stands for: a packed 4-bit tensor holds two per byte, its quant state knows the shape;
    a DeepSpeed ZeRO-3 parameter is empty between forwards, its full shape is `ds_shape`."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None) or getattr(p, "ds_shape", None)
    return math.prod(shape) if shape is not None else p.numel()
