"""bench/bench_routing_forms.py: every form's block builds as the bench times it (bf16, a spread
router, the form lynx must read), and its table. (The timing itself: `make bench-forms`.)"""

import pytest
import torch

import lynx_compile


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("bench_routing_forms")


def test_the_dense_form_is_read_as_routing_and_its_dispatch_fused(bench):
    """The bench's own dense block, at a small size: one routing site, its dense dispatch fused."""
    block = bench.DenseDispatchMoE(dim=32, intermediate=16, num_experts=8, activated=2).eval()
    torch.nn.init.normal_(block.gate.weight, std=0.5)
    [site] = lynx_compile.explain(block, torch.randn(16, 1, 32)).routing_sites
    assert site.rewritten and site.experts.startswith("fused: dense (T, E) dispatch"), site.experts


def test_the_table_has_a_row_per_form_and_batch(bench):
    rows = [{"form": "phimoe", "batch": 16, "inductor_ms": 5.21, "lynx_none_ms": 5.14, "lynx_ms": 3.43,
             "speedup": 1.52, "experts_before": 16.0, "experts_after": 14.0}]
    info = {"cpu_features": "AVX2", "cores": 2, "lynx_cpu_kernel": "auto", "read_bandwidth_gbs": 20.0,
            "torch": "2.13.0", "transformers": "5.25.0"}
    assert "| phimoe | 16 | 5.21 | 5.14 | 3.43 | 1.52x | 16 -> 14 |" in bench.markdown(info, rows)
