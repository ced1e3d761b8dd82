"""A top-k that is not routing is never rewritten: vocabulary, candidate, sampling top-ks of any
width, with or without an MoE elsewhere in the graph, stay exactly as default Inductor has them.

Detection must prove routing (`find_routing.py`): indices that gather stacked expert weights or
are histogrammed into E bins, or a router whose module sits next to E stacked experts. Indices
that only leave the graph, feed an embedding lookup or a one-hot are what candidate top-ks do.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lynx_compile
from lynx_compile.config import LynxConfig
from moe_models import TOPK, PassOnlyBackend, moe_block

THOROUGH = os.environ.get("LYNX_THOROUGH") == "1"  # make test-all: more generated cases
HEADS = ("softmax", "log_softmax", "logits")
USES = ("returned", "embedded", "one_hot")  # what the candidate ids feed


class CandidateHead(torch.nn.Module):
    """A decode step's top-k next-token candidates over a vocabulary (draft trees, candidate
    lists), optionally after an MoE block (a transformers Mixtral block) in the same graph."""

    def __init__(self, vocab: int, k: int, head: str, use: str, with_moe: bool, dim: int = 64):
        super().__init__()
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.moe = moe_block("mixtral") if with_moe else None
        self.k, self.head, self.use = k, head, use

    def forward(self, hidden):  # (B, 1, D)
        if self.moe is not None:
            hidden = self.moe(hidden)
        batch, seq, dim = hidden.shape
        logits = self.lm_head(hidden.view(-1, dim))  # (B, V)
        scores = {"softmax": torch.softmax, "log_softmax": torch.log_softmax}.get(self.head, lambda z, dim: z)(logits, -1)
        values, candidates = torch.topk(scores, self.k, dim=-1)  # (B, k)
        if self.use == "embedded":
            return values, self.embed(candidates)  # (B, k, D): the draft tree's next inputs
        if self.use == "one_hot":
            return values, torch.nn.functional.one_hot(candidates, logits.shape[-1]).sum(1)  # (B, V)
        return values, candidates


def untouched(module, hidden) -> tuple[PassOnlyBackend, tuple]:
    backend = PassOnlyBackend(LynxConfig())
    with torch.no_grad():
        got = torch.compile(module, backend=backend)(hidden)
    return backend, got


@settings(max_examples=60 if THOROUGH else 20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(vocab=st.sampled_from([16, 24, 64, 96, 512, 1024, 1025, 4096, 65536]), k=st.integers(1, 8),
       head=st.sampled_from(HEADS), use=st.sampled_from(USES), with_moe=st.booleans(),
       batch=st.sampled_from([1, 2, 7, 16, 64]))
def test_candidate_topks_are_never_rewritten(vocab, k, head, use, with_moe, batch):
    torch.manual_seed(vocab + k)
    module = CandidateHead(vocab, k, head, use, with_moe).eval()
    hidden = torch.randn(batch, 1, 64)
    torch._dynamo.reset()
    backend, _ = untouched(module, hidden)
    candidate = [s for s in backend.sites if s.num_experts == vocab]
    assert candidate and not any(s.is_routing or s.rewritten for s in candidate), [s.reason for s in candidate]
    if not with_moe:  # the graph lynx hands back is the one it was given, op for op: Inductor compiles the same
        assert backend.before == backend.after
    else:  # the MoE block's own site is rewritten; the candidates' top-k is still there
        assert backend.total("after", TOPK) >= 1


@pytest.mark.parametrize("use", USES)
def test_the_issue_example_returns_the_true_top_k_under_real_inductor(use):
    """The report's case: no MoE at all, a top-k over 1,024 columns of a linear, indices out."""
    torch.manual_seed(0)
    module = CandidateHead(1024, 2, "logits", use, with_moe=False).eval()
    hidden = torch.randn(2, 1, 64)
    with torch.no_grad():
        expected = torch.compile(module)(hidden)
        torch._dynamo.reset()
        got = torch.compile(module, backend="lynx")(hidden)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)  # bit-identical to default Inductor


class CandidatesAndLogits(CandidateHead):
    def forward(self, hidden):  # (B, 1, D)
        logits = self.lm_head(self.moe(hidden).view(hidden.shape[0], -1))  # (B, V)
        return logits, torch.topk(torch.softmax(logits, -1), self.k, dim=-1).indices


def test_a_candidate_topk_after_an_moe_layer_keeps_its_rows_under_real_inductor():
    """Eight decode rows, candidates over a 96-token vocabulary after a real MoE block whose own
    routing lynx does rewrite: every row's candidates are its own top-4 of the logits the same
    graph computed (they used to be remapped onto other rows' choices)."""
    torch.manual_seed(1)
    module = CandidatesAndLogits(96, 4, "softmax", "returned", with_moe=True).eval()
    hidden = torch.randn(8, 1, 64)
    with torch.no_grad():
        logits, candidates = torch.compile(module, backend="lynx")(hidden)
    assert torch.equal(candidates, torch.topk(torch.softmax(logits, -1), 4, dim=-1).indices)


class ClassifierBesideAConvolution(torch.nn.Module):
    """Not an MoE: a Conv1d (a 3-D weight of 32 rows) beside a 32-class head whose top-4 leaves the
    graph. One 3-D parameter is no stack of experts."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(16, 32, kernel_size=1)  # weight (32, 16, 1)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, x):  # (B, 1, 16)
        features = self.conv(x.transpose(1, 2))
        _, classes = torch.topk(self.head(x).view(-1, 32), 4)
        return classes, features


def test_a_convolution_beside_a_classifier_is_not_an_expert_stack():
    torch.manual_seed(0)
    module, x = ClassifierBesideAConvolution().eval(), torch.randn(32, 1, 16)
    [site] = lynx_compile.explain(module, x).sites
    assert not site.is_routing and "no module next to the router holds 32 stacked experts" in site.reason
    torch._dynamo.reset()
    with torch.no_grad():
        expected = torch.compile(module)(x)[0]
        torch._dynamo.reset()
        assert torch.equal(torch.compile(module, backend="lynx")(x)[0], expected)


class ChunkMemory(torch.nn.Module):
    """Not an MoE: each token retrieves its 4 nearest chunks of a (64, 4, D) memory buffer and
    attends over them. A gather of a 3-D buffer is no gather of stacked expert weights."""

    def __init__(self):
        super().__init__()
        self.keys = torch.nn.Linear(16, 64, bias=False)
        self.register_buffer("chunks", torch.randn(64, 4, 16))

    def forward(self, x):  # (B, S, D)
        b, s, d = x.shape
        q = x.reshape(-1, d)
        _, idx = torch.topk(self.keys(q), 4, dim=-1)
        memory = self.chunks[idx].reshape(q.shape[0], 16, d)  # (T, 4 chunks x 4, D)
        attention = torch.softmax(torch.einsum("td,tmd->tm", q, memory) / d ** 0.5, -1)
        return x + torch.einsum("tm,tmd->td", attention, memory).view(b, s, d)


def test_a_retrieval_top_k_over_a_buffer_is_not_routing():
    torch.manual_seed(0)
    module, x = ChunkMemory().eval(), torch.randn(16, 1, 16)
    [site] = lynx_compile.explain(module, x).sites
    assert not site.is_routing, site.dispatch
    torch._dynamo.reset()
    with torch.no_grad():
        expected = torch.compile(module)(x)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(module, backend="lynx")(x), expected)
