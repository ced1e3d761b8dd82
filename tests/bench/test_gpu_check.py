"""bench/gpu_check.py's CPU rehearsal (--dry-run): every step runs and records what the GPU run will.

The dry run is reduced to one block, one variant and one batch size so that it stays short on
two cores (about 20 s with warm Inductor caches, about a minute cold); the full rehearsal is
`python bench/gpu_check.py --dry-run --out DIR`.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--blocks", "mixtral-8x7b",
         "--variants", "lynx:binning+inductor", "--batch-sizes", "4"],
        env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_step_runs_and_is_recorded(dry_run):
    doc, markdown = dry_run
    assert doc["dry_run"] is True
    assert {name: step["status"] for name, step in doc["steps"].items()} == {
        "correctness": "ok", "cudagraphs": "ok", "latency": "ok", "selection": "ok"}
    assert "torch" in doc["machine"] and "lynx_machine" in doc["machine"]
    assert markdown.startswith("# lynx GPU check (DRY RUN on CPU: no GPU figures)")
    for section in ("## a. correctness", "## b. CUDA graphs", "## c. decode step latency"):
        assert section in markdown


def test_correctness_compares_both_expert_lowerings_with_the_reference(dry_run):
    records = dry_run[0]["steps"]["correctness"]["records"]
    ran = {(r["variant"], r["dtype"], r["case"]): r for r in records if "relative_error" in r}
    cases = ("T=1", "empty experts", "one expert takes every token", "gpt_oss (interleaved, biased)")
    for dtype in ("float32", "bfloat16"):
        for case in cases:
            for variant in ("triton_op eager", "inductor eager"):  # the Triton kernels under the interpreter
                assert ran[(variant, dtype, case)]["status"] == "ok", (variant, dtype, case)
    assert ran[("inductor compiled", "bfloat16", "empty experts")]["status"] == "ok"
    [fp32_compiled] = [r for r in records if (r["variant"], r["dtype"], r["case"]) ==
                       ("inductor compiled", "float32", "empty experts")]
    assert fp32_compiled["status"] == "skipped" and "bfloat16 only" in fp32_compiled["reason"]


def test_compiled_replays_do_not_recompile(dry_run):
    [record] = dry_run[0]["steps"]["cudagraphs"]["records"]
    assert record["variant"] == "lynx:binning+inductor"
    assert record["recompiles_during_replay"] == 0 and record["replayed_steps"] == 8 and record["finite"]


def test_latency_rows_carry_time_and_experts(dry_run):
    records = dry_run[0]["steps"]["latency"]["records"]
    [counts] = [r for r in records if r.get("what") == "experts per step"]
    before, after = counts["experts_before_after"]["4"]
    assert 2 <= after <= before <= 8
    [row] = [r for r in records if "batch" in r]
    assert row["variant"] == "lynx:binning+inductor" and row["ms"] > 0 and row["experts"] == after


def test_autotuning_is_bounded_to_decode_tiles_and_restored():
    mm_grouped = pytest.importorskip("torch._inductor.kernel.mm_grouped")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(gpu_check)
    finally:
        del sys.modules["gpu_check"]
    original = mm_grouped.grouped_mm_configs
    restore = gpu_check.bound_grouped_mm_autotuning("decode")
    try:
        bounded = mm_grouped.grouped_mm_configs()
        assert 0 < len(bounded) < len(original())
        assert all(c.kwargs["BLOCK_M"] <= 32 and c.num_stages == 3 for c in bounded)
    finally:
        restore()
    assert mm_grouped.grouped_mm_configs is original


def test_selection_rows_time_a_site_both_ways(dry_run):
    records = dry_run[0]["steps"]["selection"]["records"]
    assert {(r["E"], r["T"]) for r in records} == {(e, t) for e in (8, 128) for t in (4, 16, 64)}
    assert all(r["status"] == "ok" and r["plain_ms"] > 0 and r["ratio"] > 0 for r in records)
