"""Tensor and expert parallelism: two gloo ranks on CPU, each compiling the same tiny Mixtral with
lynx (`rank_worker.py`, one `torch.distributed.run` launch for both layouts).

Under TP (transformers' "auto" plan, plus its expert rules where they still exist) the router is replicated and its input is the same on
every rank (the hidden state after the attention's all-reduce), and every selection ranking is on
integers, so each rank selects the same experts; the experts' shards then compute their parts of
the same choice. The logits of every rank must therefore equal a one-process run of the same
options.

Under EP (`ep_size=2`: 4 whole experts per rank, transformers' AllReduceEP) lynx selects on the
global scores before the global -> local id mapping (`passes/expert_parallel.py`), so both ranks
again make the same choice (moved_mass balancing its drops over the 2 ranks, the layout's own
count), and each rank's fused op runs only the selected pairs that fall on it.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from moe_models import tiny_model

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RANKS = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    model = tiny_model("mixtral", num_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp / "model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
                          "--master_port", "29517", str(HERE / "rank_worker.py"), str(tmp / "model"), str(tmp / "out")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads((tmp / f"out.rank{r}.json").read_text()) for r in range(RANKS)]
    return tmp / "model", results


def one_process(model_dir, options):
    import importlib.util

    import transformers

    spec = importlib.util.spec_from_file_location("rank_worker", HERE / "rank_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)

    torch._dynamo.reset()
    ids = torch.randint(3, 60, (16, 4), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.compile(backend="lynx", options=options)
    return worker.decode(model, ids, 3)


def test_every_rank_selects_and_reads_fewer_experts(ranks):
    model_dir, results = ranks
    config = json.loads((model_dir / "config.json").read_text())
    for result in results:
        # where transformers can still shard experts by TP, they are: each rank holds half of every
        # expert's gate/up rows (else the experts are replicated and only attention is sharded)
        rows = config["intermediate_size"] * (1 if result["default"]["experts_tp"] else 2)
        assert result["default"]["gate_up_local_shape"] == [config["num_local_experts"], rows, config["hidden_size"]]
        experts = result["default"]["experts"]
        assert len(experts) == 2  # both layers' routing sites rewritten on this rank
        assert all(after < before for before, after in experts.values()), experts
        assert result["default"]["experts"] == results[0]["default"]["experts"]  # the same choice on every rank


def test_policy_none_equals_the_uncompiled_sharded_model(ranks):
    _, results = ranks
    for result in results:
        for eager, none in zip(result["eager"]["logits"], result["none"]["logits"]):
            torch.testing.assert_close(torch.tensor(none), torch.tensor(eager), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def one_process_default(ranks):
    return one_process(ranks[0], {})


@pytest.fixture(scope="module")
def one_process_two_ranks(ranks):
    """One process with the drop order EP sites take by default (balanced over 2 ranks)."""
    return one_process(ranks[0], {"ranks": RANKS})


def test_every_rank_computes_what_one_process_computes(ranks, one_process_default):
    _, results = ranks
    expected = one_process_default
    for result in results:
        for step, logits in zip(expected, result["default"]["logits"]):
            torch.testing.assert_close(torch.tensor(logits), step, rtol=1e-4, atol=1e-4)


def test_expert_parallel_sites_are_found_and_select_the_same_experts_on_every_rank(ranks):
    model_dir, results = ranks
    config = json.loads((model_dir / "config.json").read_text())
    experts = config["num_local_experts"]
    for rank, result in enumerate(results):
        default = result["ep_default"]
        # whole experts per rank: half of the 8 experts, each at full size
        assert default["gate_up_local_shape"] == [experts // RANKS, 2 * config["intermediate_size"],
                                                  config["hidden_size"]]
        decode_lines = [line for line in default["decisions"] if "phase=decode" in line]
        assert len(decode_lines) >= 2, default["decisions"]
        for line in decode_lines:
            assert "rewritten=True" in line, line
            assert f"expert parallel: {experts} experts, {experts // RANKS} per rank (rank {rank} of {RANKS})" in line
            assert f"ranks={RANKS}) [config, ranks from the expert-parallel layout]" in line  # balanced over ranks
            assert f"-> lynx.moe_experts (silu, gate/up concatenated fused, this rank's {experts // RANKS} experts)" \
                in line  # the rank's own dispatch fused
        # the rank reads only the experts selected for it: poisoning the others changes nothing
        assert default["local_reads"]["equal"], default["local_reads"]
        assert sum(default["local_reads"]["poisoned"]) > 0
        sites = default["experts"]
        assert len(sites) == 2
        assert all(after < before for before, after in sites.values()), sites
        assert sites == results[0]["ep_default"]["experts"]  # the same choice on every rank
        # per-rank view: at B=16 each rank reads fewer of its experts after selection
        for name, site in default["per_rank"].items():
            assert site["ranks"] == RANKS and site["max_per_rank_after"] <= site["max_per_rank_before"]
            assert sum(site["per_rank_after"]) == pytest.approx(sites[name][1])
    assert sum(s["max_per_rank_after"] for s in results[0]["ep_default"]["per_rank"].values()) \
        < sum(s["max_per_rank_before"] for s in results[0]["ep_default"]["per_rank"].values())


def test_expert_parallel_policy_none_equals_the_uncompiled_model_and_default_equals_one_process(
        ranks, one_process_two_ranks):
    _, results = ranks
    expected = one_process_two_ranks
    for result in results:
        for eager, none in zip(result["ep_eager"]["logits"], result["ep_none"]["logits"]):
            torch.testing.assert_close(torch.tensor(none), torch.tensor(eager), rtol=1e-4, atol=1e-4)
        for step, logits in zip(expected, result["ep_default"]["logits"]):
            torch.testing.assert_close(torch.tensor(logits), step, rtol=1e-4, atol=1e-4)
