"""The vLLM routing function, standalone on CPU (vLLM itself is not installable here): vLLM's
signature and dtypes, renormalize honoured, the shared contract on decode batches, plain top-k
otherwise. What runs inside vLLM is not tested here (lynx_compile/integrations/vllm.py says so)."""

import ast
import pathlib

import pytest
import torch

from lynx_compile import LynxOptionsError
from lynx_compile.integrations import vllm
from moe_models import skewed_router_logits


@pytest.mark.parametrize("policy", ["protected_mass", "affinity_binning", "opportunistic", "gate_mass_budget"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_a_decode_batch_is_selected_under_the_contract(policy, renormalize):
    logits = skewed_router_logits(num_tokens=16, num_experts=8)
    route = vllm.routing_function(policy)
    weights, ids = route(torch.randn(16, 32), logits, 2, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.shape == weights.shape == (16, 2)
    assert (ids.sort(-1).values[:, 1:] != ids.sort(-1).values[:, :-1]).all()  # k distinct experts
    probs = torch.softmax(logits, -1)
    expected = probs.gather(1, ids.long())
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected)
    plain = torch.topk(probs, 2).indices
    assert torch.unique(ids).numel() <= torch.unique(plain).numel()
    assert torch.equal(ids[:, 0].long(), plain[:, 0]) or policy in ("affinity_binning", "gate_mass_budget")


def test_a_prefill_sized_batch_and_policy_none_are_plain_top_k():
    logits = skewed_router_logits(num_tokens=16, num_experts=8)
    plain = torch.topk(torch.softmax(logits, -1), 2)
    for route in (vllm.routing_function("affinity_binning", max_decode_tokens=8), vllm.routing_function("none")):
        weights, ids = route(torch.randn(16, 32), logits, 2, False)
        assert torch.equal(ids.long(), plain.indices) and torch.equal(weights, plain.values)


def test_selection_reads_fewer_experts_on_a_skewed_decode_batch():
    logits = skewed_router_logits(num_tokens=16, num_experts=8)
    _, ids = vllm.routing_function("protected_mass", keep_mass=0.7)(torch.randn(16, 32), logits, 2, True)
    assert torch.unique(ids).numel() < torch.unique(torch.topk(logits, 2).indices).numel()


def test_bad_parameters_are_refused_when_the_function_is_made():
    with pytest.raises(LynxOptionsError, match="keep_mass"):
        vllm.routing_function("protected_mass", keep_mass=2.0)
    with pytest.raises(LynxOptionsError, match="policy"):
        vllm.routing_function("greedy")


def test_vllm_is_imported_only_inside_functions():
    """So importing lynx_compile never needs vLLM (no module-level import of it)."""
    tree = ast.parse(pathlib.Path(vllm.__file__).read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top_level for alias in node.names] + \
        [node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)]
    assert not any(name.split(".")[0] == "vllm" for name in names)
    inside = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm")]
    assert len(inside) == 2  # the forward context, and the fused MoE layer the plugin patches
