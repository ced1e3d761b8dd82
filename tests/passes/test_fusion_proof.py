"""The layout proof (passes/expert_layout.py) fuses a dispatch only where lynx::moe_experts computes
what it computes: dispatches that differ only on inputs an easy example never shows (negative or
large routing weights, huge pre-activations, a scale within 1e-4 of one, zero-compute pairs parked
on an expert their token also uses) stay as written, and every dispatch lynx does fuse equals eager.
Hand-written gpt-fast-style MoEs; each variant is one line of its forward.

Legend: T tokens, D hidden, I intermediate, E experts, A activated (k).
"""

import pytest
import torch
import torch.nn.functional as F

import lynx_compile

E, K, D, I = 8, 2, 32, 48


class Variant(torch.nn.Module):
    def __init__(self, form: str, experts: int = E, gate_columns: int = E):
        super().__init__()
        self.form = form
        self.gate = torch.nn.Linear(D, gate_columns, bias=form == "relu_dense")
        torch.nn.init.normal_(self.gate.weight, std=0.5)
        if form == "relu_dense":
            torch.nn.init.constant_(self.gate.bias, -4.0)  # raw-logit weights, many negative
        self.w1 = torch.nn.Parameter(torch.randn(experts, I, D) * 0.1)  # (E, I, D)
        self.w3 = torch.nn.Parameter(torch.randn(experts, I, D) * 0.1)  # (E, I, D)
        self.w2 = torch.nn.Parameter(torch.randn(experts, D, I) * 0.1)  # (E, D, I)

    def dense(self, x, matrix):  # every expert for every token, weighed by a (T, E) matrix
        x1 = F.silu(torch.einsum("td,eid->tei", x, self.w1))  # (T, E, I)
        x3 = torch.einsum("td,eid->tei", x, self.w3)  # (T, E, I)
        return torch.einsum("ted,te->td", torch.einsum("tei,edi->ted", x1 * x3, self.w2), matrix)  # (T, D)

    def gathered(self, x, ids, w, gate_fn=lambda g: F.silu(g)):  # each token's k experts
        x1 = gate_fn(torch.einsum("td,taid->tai", x, self.w1[ids]))  # (T, A, I)
        x3 = torch.einsum("td,taid->tai", x, self.w3[ids])  # (T, A, I)
        return torch.einsum("tad,ta->td", torch.einsum("tai,tadi->tad", x1 * x3, self.w2[ids]), w)  # (T, D)

    def forward(self, x):  # (B, 1, D)
        b, s, d = x.shape
        x = x.view(-1, d)  # (T, D)
        logits = self.gate(x)
        form = self.form
        if form == "relu_dense":  # top-k on raw logits, the dense matrix through relu
            w, ids = torch.topk(logits, K, dim=-1)
            out = self.dense(x, torch.relu(torch.zeros_like(logits).scatter(1, ids, w)))
        elif form == "clamped_dense":  # scaled weights clamped at 1
            w, ids = torch.topk(logits.softmax(-1), K, dim=-1)
            out = self.dense(x, torch.zeros_like(logits).scatter(1, ids, w * 2.5).clamp(max=1.0))
        elif form == "plain_dense":  # the dense form lynx fuses
            w, ids = torch.topk(logits.softmax(-1), K, dim=-1)
            out = self.dense(x, torch.zeros_like(logits).scatter(1, ids, w))
        elif form == "clamp_200":  # silu of a gate clamped at 200
            w, ids = torch.topk(logits.softmax(-1), K, dim=-1)
            out = self.gathered(x, ids, w, lambda g: F.silu(g.clamp(max=200.0)))
        elif form == "scaled_0.99995":  # an activation scale within 1e-4 of one
            w, ids = torch.topk(logits.softmax(-1), K, dim=-1)
            out = self.gathered(x, ids, w, lambda g: F.silu(g) * 0.99995)
        elif form == "zero_parked_dense":  # zero-compute experts parked on real ids, then scattered
            w, ids = torch.topk(logits.softmax(-1), 3, dim=-1)
            zero = ids >= E
            real = torch.where(zero, ids - E, ids)
            matrix = torch.zeros(x.shape[0], E).scatter(1, real, torch.where(zero, 0.0, w))  # a parked 0.0 may win
            out = self.dense(x, matrix) + (w * zero).sum(-1, keepdim=True) * x
        return out.view(b, s, d)


KEPT = ["relu_dense", "clamped_dense", "clamp_200", "scaled_0.99995", "zero_parked_dense"]


@pytest.mark.parametrize("form", KEPT)
def test_a_dispatch_the_fused_op_does_not_compute_is_kept(form):
    torch.manual_seed(0)
    module = Variant(form, gate_columns=E + 4 if form.startswith("zero") else E).eval()
    [site] = lynx_compile.explain(module, torch.randn(16, 1, D),
                                  config=lynx_compile.LynxConfig(policy="none", experts="fused")).routing_sites
    assert site.experts.startswith("kept:"), site.experts


def test_the_plain_dense_form_is_fused_and_equals_eager():
    torch.manual_seed(0)
    module, x = Variant("plain_dense").eval(), torch.randn(16, 1, D)
    [site] = lynx_compile.explain(module, x,
                                  config=lynx_compile.LynxConfig(policy="none", experts="fused")).routing_sites
    assert site.experts.startswith("fused: dense (T, E) dispatch"), site.experts
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(module, backend="lynx", options={"policy": "none", "experts": "fused"})(x)
        torch.testing.assert_close(got, module(x), rtol=1e-5, atol=1e-5)
