"""The selection op (`lowering/selection.py:batch_select`): decode bound, policy dispatch, and the
registered op against its Python body, for every policy."""

import pytest
import torch

from lynx_compile import policies
from lynx_compile.lowering import selection
from lynx_compile.lowering.ops import batch_select, decode_params, encode_params
from moe_models import skewed_logits

POLICY_PARAMS = {  # policy -> its parameters
    "affinity_binning": {"alpha": 0.7, "beta": 1, "confidence_gap": 1 / 0.7},
    "gate_mass_budget": {"expert_budget": 3, "confidence_gap": 1 / 0.7},
    "opportunistic": {"keep_top": 1},
    "none": {},
}
BINNING = POLICY_PARAMS["affinity_binning"]


def test_decode_bound_switches_between_selection_and_plain_topk():
    logits = skewed_logits()
    scores = torch.softmax(logits, dim=-1)
    args = (scores, logits, 2, "affinity_binning", BINNING)
    selected = selection.batch_select(*args, selection.NO_DECODE_BOUND)
    as_decode = selection.batch_select(*args, 16)  # 16 tokens <= 16 sequences
    as_prefill = selection.batch_select(*args, 4)  # 16 tokens > 4 sequences
    plain = torch.topk(scores, 2)
    assert torch.equal(as_decode[1], selected[1])
    assert torch.equal(as_prefill[1], plain.indices)
    assert torch.equal(as_prefill[0], plain.values)


@pytest.mark.parametrize("policy", POLICY_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_registered_op_matches_python_body(dtype, policy):
    logits = skewed_logits().to(dtype)
    scores = torch.softmax(logits.float(), dim=-1).to(dtype)
    params = POLICY_PARAMS[policy]
    values, indices = batch_select(scores, logits, 2, policy, encode_params(policy, params), selection.NO_DECODE_BOUND)
    expected_values, expected_indices = selection.batch_select(scores, logits, 2, policy, params)
    assert values.dtype == dtype
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)


def test_the_op_runs_the_named_policy_with_its_own_parameters():
    logits = skewed_logits()
    scores = torch.softmax(logits, dim=-1)
    _, indices = selection.batch_select(scores, logits, 2, "opportunistic", {"keep_top": 1})
    _, expected = policies.select("opportunistic", scores, logits, 2, keep_top=1)
    assert torch.equal(indices, expected)
    with pytest.raises(ValueError, match="unknown selection policy 'greedy'"):
        selection.batch_select(scores, logits, 2, "greedy", {})
    with pytest.raises(ValueError, match=r"keep_top must be an integer in \[1, k=2\], got 3"):
        selection.batch_select(scores, logits, 2, "opportunistic", {"keep_top": 3})


def test_the_op_carries_each_policys_parameters_in_their_own_types():
    """One codec between a site's setting and the op: floats in the op, ints back where a policy
    takes ints; a wrong count is refused naming the policy."""
    for policy, params in POLICY_PARAMS.items():
        decoded = decode_params(policy, encode_params(policy, params))
        assert decoded == params and [type(v) for v in decoded.values()] == [type(v) for v in params.values()]
    with pytest.raises(ValueError, match="policy 'opportunistic' takes 1 parameters"):
        decode_params("opportunistic", [1.0, 2.0])
