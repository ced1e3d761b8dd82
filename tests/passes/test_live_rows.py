"""Dead rows (fed the pad token) never vote: live rows' experts and logits do not depend on them."""

import pytest
import torch
import transformers

import lynx_compile
from lynx_compile import LynxConfig
from moe_models import PassOnlyBackend, decode_step, tiny_model

PAD = 0
LIVE = 4  # rows 0..3 live, the rest fed PAD


def step_with_dead_rows(model, dead_prompt_seed: int, batch: int = 8) -> dict:
    """One decode step: the live rows' prompts and tokens are fixed, the dead rows' histories
    (their prompts, hence their KV caches and hidden states) come from `dead_prompt_seed`."""
    prompt = torch.randint(3, 90, (batch, 3), generator=torch.Generator().manual_seed(0))
    prompt[LIVE:] = torch.randint(3, 90, (batch - LIVE, 3), generator=torch.Generator().manual_seed(dead_prompt_seed))
    ids = torch.randint(3, 90, (batch, 1), generator=torch.Generator().manual_seed(1))
    ids[LIVE:] = PAD
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    return {"input_ids": ids, "past_key_values": cache, "use_cache": True}


# Default Inductor itself is not bit-for-bit invariant to other rows' values (its GEMMs' rounding
# moves by ~1e-7), so "unchanged" means within that; a changed expert moves logits by ~1e-2.
SAME_COMPUTATION = 1e-5


@pytest.mark.parametrize("pad_token_id, live_rows_change", [(PAD, False), (None, True)],
                         ids=["dead-rows-masked", "every-row-votes"])
def test_live_rows_do_not_depend_on_dead_rows(pad_token_id, live_rows_change):
    model = tiny_model("mixtral", num_layers=2, router_std=0.05)
    compiled = torch.compile(model, backend="lynx", options={"pad_token_id": pad_token_id})
    with torch.no_grad():
        first, second = (compiled(**step_with_dead_rows(model, seed)).logits for seed in (2, 3))
    assert (first[LIVE:] - second[LIVE:]).abs().max() > 1e-3  # the dead rows did differ
    live_change = (first[:LIVE] - second[:LIVE]).abs().max()
    assert (live_change > SAME_COMPUTATION) == live_rows_change, live_change


def test_the_mask_is_built_in_the_graph_and_named_in_explain():
    model = tiny_model("qwen3_moe", num_layers=2)
    backend = PassOnlyBackend(LynxConfig(pad_token_id=PAD))
    with torch.no_grad():
        torch.compile(model, backend=backend)(**decode_step(model, 4))
    sites = backend.routing_sites
    assert [s.rewritten for s in sites] == [True, True]
    assert all(s.reason.endswith(f"rows fed token {PAD} do not vote") for s in sites)
    # one mask, shared by both layers, computed from the input ids themselves
    [graph] = backend.graphs
    masks = [n for n in graph.graph.nodes if n.target is torch.ops.aten.ne.Scalar and n.args[0].op == "placeholder"]
    assert len(masks) == 1 and masks[0].args[1] == PAD
    [embedding] = [n for n in graph.graph.nodes if n.target is torch.ops.aten.embedding.default]
    assert embedding.args[1] is masks[0].args[0]


def test_without_token_ids_in_the_graph_every_row_votes_and_explain_says_so():
    from moe_models import decode_hidden, moe_block

    report = lynx_compile.explain(moe_block("mixtral"), decode_hidden(4), config=LynxConfig(pad_token_id=PAD))
    [site] = report.routing_sites
    assert site.rewritten and "every row votes (pad_token_id=0, but no token ids" in site.reason
