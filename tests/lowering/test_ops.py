"""Every lynx:: operator passes torch.library.opcheck: schema, fake tensors, dynamic shapes."""

import pytest
import torch

from lynx_compile.lowering import ops, selection

BINNING = ("affinity_binning", [0.7, 1.0, 1.4])
SELECT_CASES = {
    "decode": lambda scores, logits: (scores, logits, 2, *BINNING, selection.NO_DECODE_BOUND),
    "bounded": lambda scores, logits: (scores, logits, 2, *BINNING, 4),
    "live-mask": lambda scores, logits: (scores, logits, 2, *BINNING, selection.NO_DECODE_BOUND,
                                         torch.arange(scores.shape[0]) % 2 == 0),
    "gate-mass-budget": lambda scores, logits: (scores, logits, 2, "gate_mass_budget", [3.0, 1.4],
                                                selection.NO_DECODE_BOUND, torch.arange(scores.shape[0]) % 2 == 0),
    "opportunistic": lambda scores, logits: (scores, logits, 2, "opportunistic", [1.0], 4, None),
    "none": lambda scores, logits: (scores, logits, 2, "none", [], selection.NO_DECODE_BOUND, None),
}


@pytest.mark.parametrize("case", SELECT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_select(case, dtype):
    logits = torch.randn(6, 8)
    scores = torch.softmax(logits, -1)
    torch.library.opcheck(ops.batch_select, SELECT_CASES[case](scores.to(dtype), logits.to(dtype)))


def test_observe_selection():
    plain = torch.topk(torch.randn(6, 8), 2).indices
    chosen = torch.topk(torch.randn(6, 8), 2).indices
    torch.library.opcheck(ops.observe_selection, (plain, chosen, torch.randn(8, 16), 8, -1, "gate"))
    voters = torch.arange(6) % 2 == 0
    torch.library.opcheck(ops.observe_selection, (plain, chosen, torch.randn(8, 16), 8, -1, "gate", voters, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("biased", [False, True])
def test_moe_experts(dtype, biased):
    tokens, hidden, inter, experts, k = 5, 16, 8, 4, 2
    ids = torch.topk(torch.randn(tokens, experts), k).indices
    weights = torch.rand(tokens, k)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, dtype=dtype) * 0.1
    w_down = torch.randn(experts, hidden, inter, dtype=dtype) * 0.1
    biases = (torch.randn(experts, inter), torch.randn(experts, inter), torch.randn(experts, hidden)) \
        if biased else (None, None, None)
    args = (torch.randn(tokens, hidden, dtype=dtype), weights, ids, w_gate_up[:, :inter], w_gate_up[:, inter:],
            w_down, *biases, "gpt_oss" if biased else "silu", 1.702, 7.0)
    torch.library.opcheck(ops.moe_experts, args)


def test_switch_select():
    logits = torch.randn(6, 8)
    torch.library.opcheck(ops.switch_select, (torch.softmax(logits, -1), logits, 2, -1, None, torch.randn(8, 16),
                                              "gate"))
