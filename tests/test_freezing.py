"""torch._inductor.config.freezing = True (Inductor's recommended CPU inference setting): lynx finds,
selects and fuses as without it, and policy none stays bit-identical to default Inductor with it.

Freezing prepacks weights (the router's matmul becomes `_mkl_linear` or `mkldnn._linear_pointwise`)
before any post-grad pass, so lynx's pass runs as a joint-graph pass there (`pass_manager.py`).
"""

import pytest
import torch

import lynx_compile
from lynx_compile import LynxConfig
from moe_models import decode_step, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_freezing_selects_and_fuses_as_without_it(dtype):
    model = tiny_model("mixtral", num_layers=2, dtype=dtype)
    with torch._inductor.config.patch(freezing=True):
        report = lynx_compile.explain(model, **decode_step(model, 8), config=LynxConfig(experts="fused"))
    assert [s.module_path for s in report.rewritten_sites] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert all(s.experts.startswith("fused: grouped_mm dispatch -> lynx.moe_experts") for s in report.rewritten_sites)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_policy_none_with_freezing_is_bit_identical_to_default_inductor_with_freezing(dtype):
    model = tiny_model("mixtral", num_layers=2, dtype=dtype)
    step = decode_step(model, 8)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        expected = torch.compile(model)(**decode_step(model, 8)).logits
        torch._dynamo.reset()
        got = torch.compile(model, backend="lynx", options={"policy": "none"})(**step).logits
    assert torch.equal(got, expected)
