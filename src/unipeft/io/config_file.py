"""PeftConfig.from_pretrained / save_pretrained: adapter_config.json <-> the method's typed config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..registry import config_class
from .atomic import write_text
from .checkpoint import CONFIG_NAME, load_config_dict, resolve_folder

# hub download options HF PEFT's from_pretrained passes along; a local folder needs none of them
_HUB_KWARGS = {"cache_dir", "token", "use_auth_token", "force_download", "local_files_only", "proxies",
               "resume_download", "repo_type", "revision", "trust_remote_code"}


def load_config(cls, path_or_id, subfolder=None, **kwargs):
    folder = resolve_folder(path_or_id, revision=kwargs.get("revision"))
    if subfolder:
        folder = folder / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"no subfolder {subfolder!r} in {path_or_id}")
    d = load_config_dict(folder)
    target = config_class(d["peft_type"])
    if not issubclass(target, cls):
        raise ValueError(f"{folder / CONFIG_NAME} holds a {d['peft_type']} adapter, not {cls.peft_type}; load it "
                         f"with {target.__name__}.from_pretrained, or PeftConfig.from_pretrained for any method")
    fields = {f.name for f in dataclasses.fields(target)}
    unknown = sorted(set(kwargs) - fields - _HUB_KWARGS)
    if unknown:
        raise TypeError(f"{target.__name__}.from_pretrained got unknown arguments {unknown}; config fields are "
                        f"{sorted(fields)}")
    d.update({k: v for k, v in kwargs.items() if k in fields})
    return target.from_dict(d)


def save_config(config, save_directory, auto_mapping_dict=None, **_) -> None:
    d = config.to_dict()
    if auto_mapping_dict is not None:
        d["auto_mapping"] = auto_mapping_dict
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / CONFIG_NAME, json.dumps(d, indent=2, sort_keys=True) + "\n")
