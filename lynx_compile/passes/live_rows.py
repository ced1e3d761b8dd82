"""Which tokens of a decode batch may vote: rows fed the pad token are dead.

`generate()` feeds finished sequences the pad token, and serving engines pad decode batches up
to a captured batch size with it. Such rows must not change which experts the live rows get.
With `pad_token_id` set, lynx derives a per-token mask inside the graph from the token ids the
model embeds:

Before (decode graph, B sequences, S = 1):

    embedding = aten.embedding(embed_weight, input_ids)     # (B, S, H), input_ids (B, S)
    ...
    batch_select = lynx.batch_select(div, mm, 2, 0.7, 1, 1.43, -1)

After:

    embedding = aten.embedding(embed_weight, input_ids)
    ne        = aten.ne.Scalar(input_ids, pad_token_id)     # (B, S) bool
    live      = aten.view(ne, [-1])                         # (T,) tokens, T = B*S
    ...
    batch_select = lynx.batch_select(div, mm, 2, 0.7, 1, 1.43, -1, live)

Why this is valid: the MoE block flattens the same (B, S) positions in the same row-major order
(checked: the (batch, seq, hidden) tensor the router input comes from has the ids' sizes). The
mask is a tensor computed in the graph, so it adds no guard and no recompile. The rule users see:
a row whose current input token is `pad_token_id` does not vote; a live row that happens to be
fed that id is treated the same way (pick a pad id your model never generates mid-sequence, e.g.
the EOS id or a dedicated pad token).
"""

from __future__ import annotations

from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import fx_match as fm
from .fx_match import aten


def find_token_ids(graph: Graph, tokens_from: Node) -> Node | None:
    """The (B, S) integer ids embedded into the batch that `tokens_from` (B, S, H) descends from."""
    batch, seq = fm.shape_of(tokens_from)[:2]
    for node in graph.nodes:
        if not fm.is_call(node, aten.embedding.default):
            continue
        ids = node.args[1]
        value = fm.fake_value(ids)
        if value is None or value.dim() != 2 or value.is_floating_point():
            continue
        if statically_known_true(value.shape[0] == batch) and statically_known_true(value.shape[1] == seq):
            return ids
    return None


def live_tokens(graph: Graph, ids: Node, pad_token_id: int) -> Node:
    """Insert `view(ne(ids, pad_token_id), [-1])` right after `ids` is available; return it."""
    anchor = next(user for user in ids.users if fm.is_call(user, aten.embedding.default))
    with graph.inserting_before(anchor):
        not_pad = graph.call_function(aten.ne.Scalar, (ids, pad_token_id))
        not_pad.meta["val"] = fm.fake_value(ids).ne(pad_token_id)
        flat = graph.call_function(aten.view.default, (not_pad, [-1]))
        flat.meta["val"] = fm.fake_value(not_pad).view(-1)
    return flat
