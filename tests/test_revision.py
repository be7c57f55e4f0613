"""`revision` of a hub adapter is honoured (the download asks for it), not accepted and ignored: through
PeftModel.from_pretrained, load_adapter and PeftConfig.from_pretrained (AutoPeftModel passes it on). The hub is replaced by a
fake snapshot_download that records the revision and serves a folder saved here (no network)."""

from __future__ import annotations

import huggingface_hub
import pytest

import unipeft
from conftest import BUILDERS


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    saved = tmp_path / "adapter"
    peft = unipeft.get_peft_model(BUILDERS["llama"](), unipeft.LoraConfig(task_type="CAUSAL_LM", r=2))
    peft.save_pretrained(saved)
    asked = []

    def snapshot_download(repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def test_from_pretrained_and_load_adapter_ask_for_the_revision(fake_hub):
    peft = unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), "org/adapter", revision="v2")
    assert fake_hub == [("org/adapter", "v2")]
    peft.load_adapter("org/adapter", "other", revision="abc123")
    assert fake_hub[-1] == ("org/adapter", "abc123")
    cfg = unipeft.PeftConfig.from_pretrained("org/adapter", revision="v3")
    assert fake_hub[-1] == ("org/adapter", "v3") and cfg.r == 2
    unipeft.PeftModel.from_pretrained(BUILDERS["llama"](), "org/adapter")
    assert fake_hub[-1] == ("org/adapter", None)  # the default branch
    assert set(peft.peft_config) == {"default", "other"}
