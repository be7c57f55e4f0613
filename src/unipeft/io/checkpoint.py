"""Read and write adapter folders. Never unpickles unless asked; every failure names the file and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def save_adapter(folder, config: dict, tensors: dict[str, torch.Tensor], safe_serialization: bool = True) -> None:
    """Write the two files; safe_serialization=False writes adapter_model.bin (torch.save of the same dict),
    as HF PEFT does. The other format's file is removed, so a folder never holds two disagreeing weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; adapter tensors are small, so plain contiguous copies are fine.
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    name, stale = (WEIGHTS_NAME, PICKLE_NAME) if safe_serialization else (PICKLE_NAME, WEIGHTS_NAME)
    with atomic_path(folder / name) as tmp:
        if safe_serialization:
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    (folder / stale).unlink(missing_ok=True)
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_folder(path, revision: str | None = None) -> Path:
    """A local adapter folder, or a hub repo id downloaded to the local cache (when online) at `revision` (a branch,
    tag or commit; None: the default branch). A local folder is one revision already: `revision` does not apply."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{path} is a file; an adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    looks_like_repo = str(path).count("/") == 1 and not str(path).startswith((".", "/"))
    if looks_like_repo:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), revision=revision,
                                         allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME]))
        except Exception as e:  # offline, unknown repo, ...
            raise FileNotFoundError(f"adapter {path!r} is not a local folder and could not be fetched from the hub: {e}") from e
    raise FileNotFoundError(f"adapter folder {path} does not exist")


def load_config_dict(folder) -> dict:
    folder = Path(folder)
    f = folder / CONFIG_NAME
    if not f.is_file():
        found = sorted(os.listdir(folder)) if folder.is_dir() else []
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder} (found: {found}); is this an adapter folder "
                                f"written by save_pretrained?")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e.msg} at line {e.lineno}); the file is damaged — re-save the "
                         f"adapter or restore the file") from None
    if not isinstance(d, dict) or "peft_type" not in d:
        raise ValueError(f"{f} has no 'peft_type' field, so the method is unknown; it must say e.g. "
                         f"\"peft_type\": \"LORA\"")
    return d


def weights_file(folder) -> Path:
    """The weights file load_tensors reads in `folder` (named in every refusal of its tensors)."""
    folder = Path(folder)
    return folder / (WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() or not (folder / PICKLE_NAME).is_file()
                     else PICKLE_NAME)


def load_tensors(folder, allow_pickle: bool = False, device="cpu") -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, else adapter_model.bin through torch's weights-only unpickler (it builds
    tensors and plain containers only, never runs code), so `allow_pickle` is no longer needed."""
    folder = Path(folder)
    st, pk = folder / WEIGHTS_NAME, folder / PICKLE_NAME
    if st.is_file():
        try:
            return load_file(str(st), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{st} is corrupt or truncated ({e}); re-save the adapter or restore the file") from None
    if pk.is_file():
        try:
            tensors = torch.load(pk, map_location=device, weights_only=True)
        except Exception as e:
            raise ValueError(f"{pk} could not be read safely: torch.load(weights_only=True) refused it or it is damaged "
                             f"({str(e).splitlines()[0]}); an adapter file holds only tensors") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{pk} is not a dict of tensors, so it is not an adapter_model.bin")
        return tensors
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder} (found: {sorted(os.listdir(folder))})")
