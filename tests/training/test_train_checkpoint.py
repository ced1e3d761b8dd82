"""Training runs in legs: a leg saves its state, a later leg resumes it, a signal stops it safely.

A tiny Mixtral-style preset on a few stdlib files, with the shipped coarse tokenizer (training a
BPE tokenizer is not what these tests are about): a few optimizer steps per leg.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lynx_compile
from lynx_compile.eval import corpora
from lynx_compile.training import data, evaluation, state, train_checkpoint

TOKENIZER = Path(lynx_compile.__file__).parent / "checkpoints" / "coarse"


@pytest.fixture(autouse=True)
def few_code_files(monkeypatch):
    """Eight files per split keep the token streams (and the test) small."""
    real = corpora.code_texts
    monkeypatch.setattr(corpora, "code_texts", lambda split: real(split)[:8])


def run_leg(tmp_path: Path, *extra: str):
    return train_checkpoint.main(["--preset", "tiny", "--out", str(tmp_path / "out"), "--state",
                                  str(tmp_path / "state"), "--threads", "1", "--quick-eval", *extra])


def adam_steps(state_dir: Path) -> set[int]:
    """Adam's per-parameter step counters in the saved optimizer state."""
    saved = torch.load(state_dir / state.LATEST / state.TRAINER_FILE, weights_only=True)
    return {int(s["step"]) for s in saved["optimizer"]["state"].values()}


def test_legs_resume_the_saved_run(tmp_path):
    first = run_leg(tmp_path, "--tokenizer", str(TOKENIZER), "--steps", "3")
    assert first["steps"] == 3 and [leg["status"] for leg in first["legs"]] == ["finished"]
    assert first["legs"][0]["init"] == "random"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # how the tokenizer was loaded (from a local directory) is not part of the checkpoint
    saved_keys = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert not set(train_checkpoint.LOADING_KEYS) & set(saved_keys)
    assert adam_steps(tmp_path / "state") == {3}

    second = run_leg(tmp_path, "--steps", "2", "--resume", "--peak-lr", "1e-3")
    assert second["steps"] == 5
    assert [leg["first_step"] for leg in second["legs"]] == [0, 3]
    assert second["legs"][1]["init"] == "resumed at step 3" and second["legs"][1]["peak_lr"] == 1e-3
    assert second["tokens_seen"] == sum(leg["tokens"] for leg in second["legs"])
    # The optimizer continued: a fresh AdamW would count 2 steps, not 5.
    assert adam_steps(tmp_path / "state") == {5}
    assert all("results" in leg for leg in second["legs"])
    # The code-token metric is greedy next-token accuracy on the held-out code windows.
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    windows = data.heldout_code_windows(
        transformers.AutoTokenizer.from_pretrained(tmp_path / "out"), evaluation.QUICK_EVAL.code_windows)
    with torch.no_grad():
        greedy = exported(input_ids=windows).logits[:, :-1].argmax(-1)
    expected = (greedy == windows[:, 1:]).float().mean().item()
    assert second["heldout_code_token_accuracy"] == pytest.approx(expected, abs=1e-3)
    assert second["legs"][1]["results"]["code_token_accuracy"] == second["heldout_code_token_accuracy"]
    # The exported checkpoint is the state's model in bf16.
    model, _, _, _ = state.load(tmp_path / "state", "grouped_mm")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    for name, param in model.named_parameters():
        if name in weights:
            assert weights[name].dtype == torch.bfloat16
            assert torch.equal(weights[name], param.detach().to(torch.bfloat16)), name


def test_a_second_run_does_not_overwrite_the_state(tmp_path):
    run_leg(tmp_path, "--tokenizer", str(TOKENIZER), "--steps", "1")
    before = (tmp_path / "state" / state.LATEST / state.TRAINER_FILE).read_bytes()
    with pytest.raises(SystemExit):
        run_leg(tmp_path, "--tokenizer", str(TOKENIZER), "--steps", "1")
    assert (tmp_path / "state" / state.LATEST / state.TRAINER_FILE).read_bytes() == before


def test_resume_without_state_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_leg(tmp_path, "--resume", "--steps", "1")
    assert "no training state" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--minutes", "0"], ["--steps", "0"], ["--peak-lr", "-1"],
                                 ["--code-seqs", "0", "--arith-seqs", "0"]])
def test_bad_arguments_are_named(tmp_path, capsys, bad):
    with pytest.raises(SystemExit):
        run_leg(tmp_path, *bad)
    assert bad[0] in capsys.readouterr().err


def test_a_signal_stops_the_leg_after_its_step_and_saves(tmp_path, monkeypatch):
    run_leg(tmp_path, "--tokenizer", str(TOKENIZER), "--steps", "2")
    report_before = (tmp_path / "out" / "training_report.json").read_text()
    real_next = data.TrainBatches.__next__
    calls = []

    def next_then_signal(self):
        calls.append(1)
        if len(calls) == 2:  # during the leg's second step, as a user's Ctrl-C would
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(data.TrainBatches, "__next__", next_then_signal)
    handler_before = signal.getsignal(signal.SIGINT)  # pytest-xdist workers ignore SIGINT
    assert run_leg(tmp_path, "--steps", "1000", "--resume") is None
    assert adam_steps(tmp_path / "state") == {4}  # 2 + the two steps it ran
    # An interrupted leg exports nothing: the checkpoint and its report are the first leg's.
    assert (tmp_path / "out" / "training_report.json").read_text() == report_before
    assert signal.getsignal(signal.SIGINT) is handler_before  # the leg put the handler back

    monkeypatch.setattr(data.TrainBatches, "__next__", real_next)
    report = run_leg(tmp_path, "--steps", "1", "--resume")
    assert [leg["status"] for leg in report["legs"]] == ["finished", "interrupted", "finished"]
    assert report["steps"] == 5


def test_a_save_cut_between_its_renames_is_resumed_from_the_previous_one(tmp_path):
    run_leg(tmp_path, "--tokenizer", str(TOKENIZER), "--steps", "2")
    # what a kill leaves after the previous save was moved aside and before the new one was renamed in
    os.replace(tmp_path / "state" / state.LATEST, tmp_path / "state" / state.PREVIOUS)
    assert state.exists(tmp_path / "state")
    report = run_leg(tmp_path, "--steps", "1", "--resume")
    assert report["steps"] == 3 and adam_steps(tmp_path / "state") == {3}
    assert not (tmp_path / "state" / state.PREVIOUS).exists()
