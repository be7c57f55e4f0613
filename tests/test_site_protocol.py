"""Every installed insertion is a `Site` (one protocol for the module, attention-K/V and input sites), for every
position kind: what Handle, PeftModel and the state dicts rely on is there, with the types they expect."""

from __future__ import annotations

import pytest

import unipeft
from conftest import BUILDERS
from unipeft.positions import ModuleSite, Site
from unipeft.positions.attention_kv import AttentionKVSite
from unipeft.positions.input import InputSite
from unipeft.spec import Insertion

CASES = {  # method -> the site class it installs (one per position kind)
    "lora": ModuleSite, "houlsby": ModuleSite, "prefix_tuning": AttentionKVSite, "prompt_tuning": InputSite,
    "p_tuning": InputSite,
}
OPTIONS = {"prefix_tuning": {"num_virtual_tokens": 3}, "prompt_tuning": {"num_virtual_tokens": 3},
           "p_tuning": {"num_virtual_tokens": 3, "encoder_hidden_size": 8}}


@pytest.mark.parametrize("method", CASES)
def test_every_installed_site_is_a_site(method):
    cfg = unipeft.methods()[method].factory(task_type="CAUSAL_LM", **OPTIONS.get(method, {}))
    peft = unipeft.get_peft_model(BUILDERS["llama"](), cfg)
    sites = peft.handle.sites
    assert sites and all(isinstance(s, CASES[method]) for s in sites)
    for s in sites:
        assert isinstance(s, Site), type(s).__name__
        assert isinstance(s.ins, Insertion) and isinstance(s.host_name, str) and isinstance(s.path, str)
        assert s.active is True and s.merged is False
    peft.unload()
    assert not peft.handle.sites


def test_the_protocol_refuses_a_class_missing_a_member():
    class NoRemove:
        ins = delta = switch = None
        host_name, path, merged, active = "", "", False, True

        def merge(self): ...

        def unmerge(self): ...

    assert not isinstance(NoRemove(), Site)
    NoRemove.remove = lambda self: None
    assert isinstance(NoRemove(), Site)
