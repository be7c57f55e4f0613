"""The one place that touches private names of transformers, accelerate and TRL: making them see our PeftModel.

transformers' Trainer, accelerate and TRL decide "is this a PEFT model?" with an isinstance check against HF PEFT's
classes (`transformers.trainer_utils._is_peft_model`, `accelerate.utils.is_peft_model`), and return False when
peft is not installed. That answer picks their code path: save_pretrained (adapter-only) versus the full
state_dict with tied tensors, load_adapter on resume and for load_best_model_at_end, the base model's forward
signature for dataset columns and label names, and TRL's fused LM head on the base model's backbone. We cannot
subclass HF PEFT's class without importing peft, so we extend the predicates instead: each becomes
"the original answer, or one of ours". Nothing else in those libraries changes.

Names touched (each has a test in tests/test_compat.py, named after it):
- transformers.trainer_utils._is_peft_model and every module that bound it (transformers.trainer, neftune);
- accelerate.utils.is_peft_model (accelerate.utils.modeling) and every module that bound it (TRL's trainers);
- transformers.trainer's globals `PeftModel` and `is_peft_available`, which form Trainer._save's
  `supported_classes` (with peft absent `is_peft_available()` is False there and only PreTrainedModel is saved
  through save_pretrained);
- TRL trainers' global `BaseTunerLayer` (HF PEFT's layer class, imported by TRL only when peft is installed, yet
  read after `is_peft_model(model)` is True): where absent it is bound to a class nothing is an instance of.

Modules imported later are patched as they load (a meta-path finder), so import order does not matter.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

_lock = threading.RLock()
_ours: tuple[type, ...] = ()  # our PeftModel class(es), set by register()
_wrappers: dict[int, object] = {}  # id(original predicate) -> its extension
_originals: dict[int, object] = {}  # keeps the originals alive so their ids stay unique
_PATCHED_PREFIXES = ("transformers", "accelerate", "trl")
_SOURCES = {"transformers.trainer_utils": "_is_peft_model", "accelerate.utils.modeling": "is_peft_model"}


class NoPeftTunerLayer:
    """Stands in for HF PEFT's BaseTunerLayer where peft is not installed: our deltas are hooks, not layer
    classes, so nothing is an instance of it."""


def register(peft_model_class: type) -> None:
    """Make transformers, accelerate and TRL treat instances of `peft_model_class` as PEFT models. Idempotent."""
    global _ours
    with _lock:
        if peft_model_class not in _ours:
            _ours = _ours + (peft_model_class,)
        if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchOnImport())
        sync()


def is_unipeft_model(model) -> bool:
    return bool(_ours) and isinstance(model, _ours)


def _extend(original, unwrap=None):
    """`original(model) or model is ours`, keyed by the original's identity so every binding maps to one wrapper."""
    key = id(original)
    if key in _wrappers or getattr(original, "_unipeft_extends", None) is not None:
        return _wrappers.get(key, original)

    def extended(model):
        if original(model):
            return True
        inner = unwrap(model) if unwrap is not None else model
        if is_unipeft_model(inner):
            sync()  # modules imported since (e.g. TRL's trainers) get the other names they read next
            return True
        return False

    extended._unipeft_extends = original
    extended.__name__, extended.__doc__ = getattr(original, "__name__", "is_peft_model"), original.__doc__
    _wrappers[key], _originals[key] = extended, original
    return extended


def _unwrap_parallel(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _true() -> bool:
    return True


def sync() -> None:
    """Patch every loaded module of transformers/accelerate/TRL that binds an original predicate or reads the
    names listed in the module docstring."""
    with _lock:
        for name, attr in _SOURCES.items():
            mod = sys.modules.get(name)
            if mod is not None and hasattr(mod, attr):
                unwrap = _unwrap_parallel if name.startswith("accelerate") else None
                _extend(getattr(mod, attr), unwrap)
        if not _wrappers:
            return
        for name, mod in list(sys.modules.items()):
            if mod is None or not name.startswith(_PATCHED_PREFIXES):
                continue
            d = getattr(mod, "__dict__", None)
            if d is None:
                continue
            binds = False
            for attr in ("_is_peft_model", "is_peft_model"):
                f = d.get(attr)
                if f is not None and id(f) in _wrappers:
                    d[attr] = _wrappers[id(f)]
                    binds = True
                elif f is not None and getattr(f, "_unipeft_extends", None) is not None:
                    binds = True
            if name == "transformers.trainer":
                _patch_supported_classes(d)
            elif binds and name.startswith("trl.") and "BaseTunerLayer" not in d:
                d["BaseTunerLayer"] = NoPeftTunerLayer


def _patch_supported_classes(d: dict) -> None:
    """Trainer._save: `supported_classes = (PreTrainedModel,) if not is_peft_available() else
    (PreTrainedModel, PeftModel)`; models of these classes are saved with save_pretrained."""
    current = d.get("PeftModel")
    flat = current if isinstance(current, tuple) else ((current,) if current is not None else ())
    if not all(c in flat for c in _ours):
        d["PeftModel"] = flat + tuple(c for c in _ours if c not in flat)
    available = d.get("is_peft_available")
    if available is not None and available is not _true and not available():
        d["is_peft_available"] = _true


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs sync() right after a transformers/accelerate/TRL module that reads a predicate finishes loading."""

    _watched = ("transformers.trainer_utils", "transformers.trainer", "accelerate.utils.modeling",
                "accelerate.utils", "transformers.integrations.neftune")

    def __init__(self):
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if not (fullname in self._watched or fullname.startswith("trl.trainer.")) or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            from importlib.util import find_spec

            spec = find_spec(fullname)
        except (ImportError, ValueError):
            return None
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            sync()

        spec.loader.exec_module = exec_module
        return spec
