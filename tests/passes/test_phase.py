"""Phase awareness: only decode batches are remapped; decided at compile time where shapes allow."""

import torch
from torch._dynamo.utils import counters

from lynx_compile.config import LynxConfig
from moe_models import (
    BATCH_SELECT,
    TOPK,
    topks_in_selection,
    FlatTokensMoE,
    PassOnlyBackend,
    RoutingProbe,
    moe_block,
    skewed_mixtral_block,
)


def test_prefill_graph_is_left_alone():
    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(moe_block("mixtral"), backend=backend)(torch.randn(2, 5, 64))
    [site] = backend.routing_sites
    assert not site.rewritten and site.reason == "not rewritten: prefill graph (seq len 5)"
    assert backend.before == backend.after


def test_phase_all_remaps_prefill_too():
    backend = PassOnlyBackend(LynxConfig(phase="all"))
    with torch.no_grad():
        torch.compile(moe_block("mixtral"), backend=backend)(torch.randn(2, 5, 64))
    [site] = backend.routing_sites
    assert site.rewritten and site.reason == "rewritten: phase='all' remaps every batch"


def test_symbolic_seq_len_is_decided_at_run_time_in_one_graph():
    """An unbacked seq len cannot be decided at compile time: the same graph must remap the
    decode call (seq 1) and leave the prefill call (seq 3) exactly as plain top-k."""
    block, hidden = skewed_mixtral_block()
    probe = RoutingProbe(block).eval()
    backend = PassOnlyBackend()
    compiled = torch.compile(probe, backend=backend, dynamic=True)
    decode = hidden[:6]  # (6, 1, H)
    prefill = hidden[:6].view(2, 3, -1)  # (2, 3, H): the same tokens, as 2 sequences of 3
    torch._dynamo.decorators.mark_unbacked(decode, 1)
    torch._dynamo.decorators.mark_unbacked(prefill, 1)
    with torch.no_grad():
        _, plain_indices, _ = probe(decode)
        _, decode_indices, _ = compiled(decode)
        _, prefill_indices, _ = compiled(prefill)

    [site] = backend.routing_sites
    assert site.phase.mode == "runtime" and site.rewritten
    assert len(backend.graphs) == 1
    assert torch.unique(decode_indices).numel() < torch.unique(plain_indices).numel()
    assert torch.equal(prefill_indices, plain_indices)


def test_flat_token_input_needs_a_token_bound():
    moe = FlatTokensMoE().eval()
    tokens = torch.randn(8, 32)
    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(moe, backend=backend)(tokens)
    [site] = backend.routing_sites
    assert not site.rewritten and site.reason.startswith("not rewritten: phase unknown")
    assert backend.before == backend.after

    torch._dynamo.reset()
    backend = PassOnlyBackend(LynxConfig(max_decode_tokens=16))
    with torch.no_grad():
        torch.compile(moe, backend=backend)(tokens)
    [site] = backend.routing_sites
    assert site.rewritten and site.reason == "rewritten: 8 tokens <= max_decode_tokens=16"

    torch._dynamo.reset()
    backend = PassOnlyBackend(LynxConfig(max_decode_tokens=4))
    with torch.no_grad():
        torch.compile(moe, backend=backend)(tokens)
    [site] = backend.routing_sites
    assert not site.rewritten and site.reason == "not rewritten: 8 tokens > max_decode_tokens=4"


def test_token_bound_with_dynamic_token_count_is_tested_at_run_time():
    moe = FlatTokensMoE().eval()
    backend = PassOnlyBackend(LynxConfig(max_decode_tokens=16))
    compiled = torch.compile(moe, backend=backend, dynamic=True)
    with torch.no_grad():
        for num_tokens in (4, 12, 40):
            torch.testing.assert_close(compiled(torch.randn(num_tokens, 32)).shape, (num_tokens, 32))
    [site] = backend.routing_sites
    assert site.phase.mode == "runtime" and site.phase.token_bound == 16
    assert len(backend.graphs) == 1
    # the plain top-k the selection computes anyway doubles as the prefill result: no extra top-k
    assert backend.after[0][BATCH_SELECT] == 0 and backend.after[0][TOPK] == topks_in_selection()


def test_changing_batch_size_adds_no_recompiles_beyond_dynamos_own():
    block = moe_block("olmoe")
    counts = {}
    for name, backend in (("eager", "eager"), ("lynx", PassOnlyBackend())):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(block, backend=backend)
        with torch.no_grad():
            for batch in (2, 3, 4, 8, 16, 5):
                compiled(torch.randn(batch, 1, 64))
        counts[name] = counters["stats"]["unique_graphs"]
    assert counts["lynx"] == counts["eager"] == 2  # static first call, then one dynamic graph


class SeqFirstInside(torch.nn.Module):
    """A block that turns (batch, seq, hidden) seq-first before flattening (Megatron's [s, b, h])."""

    def __init__(self):
        super().__init__()
        self.block = moe_block("mixtral")

    def forward(self, x):  # (B, S, H)
        return self.block(x.transpose(0, 1)).transpose(0, 1)  # the block flattens (S, B, H)


def test_a_seq_first_block_is_read_through_its_transpose():
    """A B=1 prefill of 16 tokens becomes (16, 1, H) inside: seq is read from the (1, 16, H) input."""
    backend = PassOnlyBackend()
    with torch.no_grad():
        torch.compile(SeqFirstInside().eval(), backend=backend)(torch.randn(1, 16, 64))
    [site] = backend.routing_sites
    assert not site.rewritten and site.reason == "not rewritten: prefill graph (seq len 16)", site.reason
    assert backend.before == backend.after
