"""Small slices of bench/bench_expert_kernels.py and bench/bench_real_model.py: they measure what
their labels say (the kernel equals the library it is timed against; the real-model bench builds a
materialized model and its policy-none variant is default Inductor), at tiny sizes."""

import torch


def test_the_kernel_bench_times_lynx_on_the_library_s_own_result(load_bench):
    bench = load_bench("bench_expert_kernels")
    rows = bench.measure_level("AMX", (3,), repeats=1, blocks={"tiny": (64, 96, 8, 2)})
    [row] = rows
    assert 2 <= row["experts_present"] <= 6
    for path in bench.LEVELS["AMX"][1]:  # auto and bf16dot: each runs on any CPU (emulated where absent)
        assert row[f"lynx:{path}_relative_error"] <= 2e-2, path
    table = bench.markdown(rows, {"cpu_features": "X", "cores": 2, "torch": torch.__version__})
    assert "| tiny | 3 |" in table


TINY_OLMOE = dict(hidden_size=64, intermediate_size=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=128, max_position_embeddings=512,
                  norm_topk_prob=False)


def test_the_real_model_bench_materializes_its_model_and_none_is_default_inductor(load_bench):
    bench = load_bench("bench_real_model")
    model = bench.build(TINY_OLMOE)
    assert not any(p.is_meta for p in model.parameters()) and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fresh = type(model.model.rotary_emb)(config=model.config)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.inv_freq)  # rebuilt, not left empty
    expert_bytes = 3 * 32 * 64 * 2
    assert bench.step_bytes(model, 5, 4) - bench.step_bytes(model, 2, 4) == 3 * expert_bytes
    [row] = bench.run(model, (4,), repeats=1, bandwidth=10.0)
    assert row["lynx:none_equals_inductor"]
    assert row["lynx:default_experts"] <= row["plain_experts"] <= 2 * 4 * 2  # layers x tokens x k
    assert 0 < row["lynx:default_bandwidth_share"]
