"""Each policy whose checks live beside it (tests/policies/test_<policy>.py) compiles on both CPU
selection paths, the C++ kernel and the traced body, and in `record()`'s variant, which always
lowers the traced body (it observes inside it)."""

import pytest
import torch

import lynx_compile
from moe_models import decode_step, tiny_model


@pytest.mark.parametrize("options", [{"policy": "protected_mass", "keep_mass": 0.6},
                                     {"policy": "moved_mass", "max_moved": 0.2}], ids=lambda o: o["policy"])
@pytest.mark.parametrize("path", ["kernel", "body"])
def test_it_compiles_on_both_paths_and_in_the_recording_variant(path, options, monkeypatch):
    monkeypatch.setenv("LYNX_SELECTION", path)
    model = tiny_model("qwen3_moe", num_layers=1)
    model.compile(backend="lynx", options=options)
    with torch.no_grad():
        logits = model(**decode_step(model, 16)).logits
        with lynx_compile.record(model) as recorder:
            model(**decode_step(model, 16))
    assert torch.isfinite(logits).all()
    [calls] = recorder.summary().values()
    assert calls["experts_after"] <= calls["experts_before"]
