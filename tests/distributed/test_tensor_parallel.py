"""Tensor parallelism: two gloo ranks on CPU (transformers' `tp_plan="auto"`), each compiling the
same tiny Mixtral with lynx (`tp_worker.py`, launched by `torch.distributed.run`).

Under TP the router is replicated and its input is the same on every rank (the hidden state after
the attention's all-reduce), and every selection ranking is on integers, so each rank selects the
same experts; the experts' shards then compute their parts of the same choice. The logits of
every rank must therefore equal a one-process run of the same options.
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
    tmp = tmp_path_factory.mktemp("tp")
    model = tiny_model("mixtral", num_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp / "model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
                          "--master_port", "29517", str(HERE / "tp_worker.py"), str(tmp / "model"), str(tmp / "out")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads((tmp / f"out.rank{r}.json").read_text()) for r in range(RANKS)]
    return tmp / "model", results


def one_process(model_dir, options):
    import importlib.util

    import transformers

    spec = importlib.util.spec_from_file_location("tp_worker", HERE / "tp_worker.py")
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
        # the experts really are sharded: each rank holds half of every expert's gate/up rows
        assert result["default"]["gate_up_local_shape"] == [config["num_local_experts"],
                                                             config["intermediate_size"], config["hidden_size"]]
        experts = result["default"]["experts"]
        assert len(experts) == 2  # both layers' routing sites rewritten on this rank
        assert all(after < before for before, after in experts.values()), experts
        assert result["default"]["experts"] == results[0]["default"]["experts"]  # the same choice on every rank


def test_policy_none_equals_the_uncompiled_sharded_model(ranks):
    _, results = ranks
    for result in results:
        for eager, none in zip(result["eager"]["logits"], result["none"]["logits"]):
            torch.testing.assert_close(torch.tensor(none), torch.tensor(eager), rtol=1e-4, atol=1e-4)


def test_every_rank_computes_what_one_process_computes(ranks):
    model_dir, results = ranks
    expected = one_process(model_dir, {})
    for result in results:
        for step, logits in zip(expected, result["default"]["logits"]):
            torch.testing.assert_close(torch.tensor(logits), step, rtol=1e-4, atol=1e-4)
