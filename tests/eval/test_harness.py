"""`lynx-compile eval` end to end on a tiny slice of the shipped coarse checkpoint."""

import json

import pytest
import torch

from lynx_compile.eval import decode, harness, tasks
from lynx_compile.eval.checkpoints import resolve_checkpoint
from lynx_compile.eval.__main__ import main as eval_main
from lynx_compile.eval.__main__ import problems_per_task

# The arith run (generate(), ~2.5 min cold) is in `make test-all`; `make test` checks the same
# variants on code-token in test_comparison.py.
SLOW = pytest.mark.slow
PROBLEMS = 4  # one batch: one prompt length, so each variant compiles the fewest graphs
BATCH = 4


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    # One task, one batch: ~2 minutes with a cold compile cache (each variant compiles prefill and decode).
    out = tmp_path_factory.mktemp("eval")
    [result] = eval_main(["--checkpoint", "coarse", "--task", "arith", "--batch-sizes", str(BATCH),
                          "--problems", str(PROBLEMS), "--policies", "none", "--eager", "--record-batches", "1",
                          "--no-progress", "--out", str(out)])
    return result, out


def rows_of(result, variant):
    return {row["task"]: row for row in result["rows"] if row["variant"] == variant}


@SLOW
def test_writes_json_and_plot(result):
    result, out = result
    assert json.loads((out / "eval_coarse.json").read_text())["rows"] == result["rows"]
    assert (out / "eval_coarse.png").stat().st_size > 0
    assert {row["variant"] for row in result["rows"]} == {"eager", "inductor", "lynx:none"}


@SLOW
def test_policy_none_matches_the_uncompiled_model(result):
    result, _ = result
    eager, none = rows_of(result, "eager"), rows_of(result, "lynx:none")
    for task in ("arith",):  # code-token's decoding is checked against a plain forward below
        assert none[task]["problems"] == eager[task]["problems"] >= PROBLEMS
        assert none[task]["accuracy"] == eager[task]["accuracy"]
        assert none[task]["flipped_vs_eager"] == 0


@SLOW
def test_counts_experts_and_steps(result):
    result, _ = result
    for row in rows_of(result, "lynx:none").values():
        assert len(row["experts_by_layer"]) == 4  # one routing site per layer
        for before, after in row["experts_by_layer"].values():
            assert 2 <= after == before <= 8  # top-2 of 8 experts, untouched by policy none
        assert row["decode_steps"] > 0 and row["step_ms"] > 0
        assert row["changed_vs_inductor"] == 0 and "speedup_vs_inductor" in row


@SLOW
def test_the_uncompiled_model_is_not_recorded(result):
    result, _ = result
    assert all("experts_by_layer" not in row for row in rows_of(result, "inductor").values())


def test_teacher_forcing_predicts_what_a_plain_forward_predicts():
    model, tokenizer = harness.load(resolve_checkpoint("coarse"), torch.float32, harness.Variant("eager", None))
    windows = tasks.code_token_windows(tokenizer, count=2 * tasks.CODE_TOKEN_STEPS)
    assert windows.shape == (2, tasks.CODE_TOKEN_PREFIX + tasks.CODE_TOKEN_STEPS + 1)
    assert not (windows[:, 1:] == tokenizer.eos_token_id).any()  # generate() would stop a row at EOS
    predictions = decode.teacher_forced_predictions(model, windows, tasks.CODE_TOKEN_PREFIX, 2, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    expected = logits[:, tasks.CODE_TOKEN_PREFIX:].argmax(-1)
    assert predictions.shape == expected.shape == (2, tasks.CODE_TOKEN_STEPS)
    assert (predictions == expected).float().mean() > 0.95  # cache vs full forward: rare fp ties only


def test_bad_input_is_named():
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        resolve_checkpoint("no-such-checkpoint")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        harness.evaluate("coarse", ["poetry"], [1], ["none"], 4)
    for bad in (["--problems", "0"], ["--batch-sizes", "16", "0"], ["--checkpoint", "no-such-checkpoint"]):
        with pytest.raises(SystemExit):
            eval_main(bad)


def test_problems_are_given_per_task_or_for_all():
    assert problems_per_task(["64"], ["arith", "code-token"]) == {"arith": 64, "code-token": 64}
    assert problems_per_task(["arith=4"], ["arith", "code-token"]) == {"arith": 4, "code-token": 500}
    for bad, message in ((["poetry=4"], "names task 'poetry'"), (["arith=0"], "positive count"),
                         (["many"], "'many': expected a positive count")):
        with pytest.raises(ValueError, match=message):
            problems_per_task(bad, ["arith", "code-token"])
    with pytest.raises(SystemExit):
        eval_main(["--task", "arith", "--problems", "code-token=4"])
