"""lynx-compile explain and calibrate on local checkpoints (tiny real models saved to disk)."""

import argparse
import json
import shutil

import pytest

from lynx_compile import LynxConfig
from lynx_compile.calibration.__main__ import parse_budget
from lynx_compile.cli import main
from lynx_compile.eval import checkpoints
from moe_models import tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 2-layer Qwen3-MoE with the shipped tokenizer (so its vocabulary)."""
    path = tmp_path_factory.mktemp("tiny_checkpoint")
    tiny_model("qwen3_moe", num_layers=2, vocab_size=4096, pad_token_id=1).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoints.CHECKPOINTS / "coarse" / name, path / name)
    return path


def test_explain_prints_the_table_of_a_real_decode_step(checkpoint, capsys):
    main(["explain", "--checkpoint", str(checkpoint), "--batch", "8"])
    out = capsys.readouterr().out
    assert "one decode step, B=8, 8 tokens cached" in out
    assert "2 routing site(s), 2 rewritten" in out  # a decode step (a (B, 1) call without cache would be prefill)
    for layer in (0, 1):
        assert f"model.layers.{layer}.mlp.gate" in out
    assert "rows fed token 1 do not vote" in out


@pytest.mark.slow  # plan entries in explain: also tests/calibration/test_calibrate.py
def test_explain_shows_the_plan_entry_of_each_site(checkpoint, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"sites": {"model.layers.1.mlp.gate": {"policy": "opportunistic",
                                                                      "params": {"keep_top": 1}}}}))
    main(["explain", "--checkpoint", str(checkpoint), "--batch", "4", "--policy", "none", "--plan", str(plan)])
    out = capsys.readouterr().out
    assert f"plan={plan}" in out.splitlines()[1]
    assert "none [config (site not in plan)]" in out
    assert f"opportunistic(keep_top=1) [plan {plan}]" in out


def test_cli_errors_name_the_problem(checkpoint, capsys):
    for argv in (["explain", "--checkpoint", "no-such-checkpoint"], ["explain", "--checkpoint", str(checkpoint),
                                                                      "--batch", "0"],
                 ["calibrate", "--checkpoint", str(checkpoint), "--budget", "kl=-1"],
                 ["frobnicate"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert parse_budget("kl=0.01,top1_agreement=0.95") == {"kl": 0.01, "top1_agreement": 0.95}
    with pytest.raises(argparse.ArgumentTypeError, match="kl="):
        parse_budget("kl")


@pytest.mark.slow  # calibrate() itself: tests/calibration/test_calibrate.py
def test_calibrate_writes_a_plan_that_loads(checkpoint, tmp_path, capsys):
    out = tmp_path / "plan.json"
    main(["calibrate", "--checkpoint", str(checkpoint), "--budget", "top1_agreement=0.9", "--batches", "1",
          "--batch-size", "4", "--prefix", "8", "--steps", "3", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "combined (measured)" in printed
    plan = json.loads(out.read_text())
    assert plan["calibration"]["decode_tokens"] == 4 * 3 and plan["budget"] == {"top1_agreement": 0.9}
    assert plan["combined"]["top1_agreement"] >= 0.9
    loaded = LynxConfig(plan=str(out)).plan
    assert loaded.site_names() == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
