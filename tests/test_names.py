"""unipeft.names: one matcher for every module-path rule, checked against HF PEFT's own functions (the oracle)
and against hand-written cases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from unipeft.names import matches, pattern_key, pattern_layer_index

tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
peft_other = pytest.importorskip("peft.utils.other")

PATHS = ["model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.xq_proj", "model.layers.3.mlp.up_proj",
         "q_proj", "encoder.block.2.layer.0.SelfAttention.q", "transformer.h.1.attn.c_attn",
         "model.layers.1.block_sparse_moe.experts.0.w1", "model.decoder.layers.5.encoder_attn.q_proj", "lm_head"]
TARGETS = [("q_proj",), ("q_proj", "v_proj"), ("self_attn.q_proj",), ("attn.q_proj",), ("q",), ("w1",),
           ("layers.0.self_attn.q_proj",), ("model.layers.3.mlp.up_proj",), ("proj",), ("lm_head",),
           r".*\.q_proj", r".*self_attn\.(q|xq)_proj", "q_proj", r"model\.layers\.\d+\.mlp\..*"]


def hf_config(**kw):
    base = dict(target_modules=None, target_parameters=None, exclude_modules=None, modules_to_save=None,
                layers_to_transform=None, layers_pattern=None)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("targets", TARGETS, ids=str)
def test_matches_is_hf_peft_target_modules_rule(targets):
    for path in PATHS:
        theirs = tuners_utils.check_target_module_exists(
            hf_config(target_modules=targets if isinstance(targets, str) else list(targets)), path)
        assert matches(path, targets) == bool(theirs), (path, targets)


@pytest.mark.parametrize("exclude", [("q_proj",), r".*mlp.*", ("layers.0.self_attn.q_proj",)], ids=str)
def test_matches_is_hf_peft_exclude_modules_rule(exclude):
    for path in PATHS:
        excluded = isinstance(tuners_utils.check_target_module_exists(
            hf_config(target_modules=r".*", exclude_modules=exclude if isinstance(exclude, str) else list(exclude)),
            path), tuners_utils._ExcludedModule)
        assert matches(path, exclude) == excluded, (path, exclude)


@pytest.mark.parametrize("pattern", [["layers"], ["h"], ["block"], ["layers", "h"], ["experts"]], ids=str)
@pytest.mark.parametrize("layers", [[0], [1, 3], [5, 11]], ids=str)
def test_pattern_layer_index_is_hf_peft_layers_pattern_rule(pattern, layers):
    names = ("q_proj", "xq_proj", "up_proj", "q", "c_attn", "w1")
    # (a bare top-level name equal to a target is outside every layer: HF PEFT keeps it by the order of its
    # checks, unipeft's layers_to_transform drops it; no model has such a target)
    for path in [p for p in PATHS if "." in p]:
        theirs = tuners_utils.check_target_module_exists(
            hf_config(target_modules=list(names), layers_to_transform=layers, layers_pattern=pattern), path)
        ours = matches(path, names) and pattern_layer_index(path, pattern) in layers
        assert ours == bool(theirs), (path, pattern, layers)


def test_hand_written_cases():
    assert matches("model.layers.0.self_attn.q_proj", ("q_proj",))
    assert not matches("model.layers.0.self_attn.xq_proj", ("q_proj",))  # a suffix only on a "." boundary
    assert not matches("model.layers.0.self_attn.q_proj", "q_proj")  # a string is a regex over the whole path
    assert matches("model.layers.0.self_attn.q_proj", r".*\.q_proj")
    assert pattern_layer_index("model.layers.1.block_sparse_moe.experts.0.w1", ["layers"]) == 1  # the first index
    assert pattern_layer_index("model.layers.1.block_sparse_moe.experts.0.w1", ["experts"]) == 0
    assert pattern_layer_index("lm_head", ["layers"]) is None


@pytest.mark.parametrize("keys", [["q_proj"], ["layers.0.self_attn.q_proj", "q_proj"], [r"layers\.\d+\.mlp\..*"],
                                  ["proj"], ["v_proj", "self_attn.q_proj"]], ids=str)
def test_pattern_key_is_hf_peft_rank_pattern_rule(keys):
    for path in PATHS:
        theirs = peft_other.get_pattern_key(keys, path)
        assert (pattern_key(keys, path) or path) == theirs, (path, keys)
