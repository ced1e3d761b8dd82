"""Accuracy and decode time of a checkpoint compiled by default Inductor and by ``backend="lynx"``.

For each variant (``inductor``, then ``lynx:<policy>`` per policy; ``eager`` on request) the
checkpoint is loaded fresh and compiled in place with ``model.compile(...)``, so that
transformers' own ``generate()`` runs the compiled forward, as it does for users. Every task
then runs at every batch size B with the same problems. Per (variant, B) the row holds:

* accuracy (and the number correct) over the task's problems;
* ``changed_vs_inductor``: problems whose output differs from default Inductor's at the same B,
  and ``flipped_vs_inductor``: problems whose correctness differs;
* ``step_ms``: median decode-step time over the whole task, after one untimed batch that
  compiles what this batch size needs;
* for lynx variants, distinct experts per decode step per layer, before selection (the batch's
  plain top-k) and after, from ``lynx_compile.record`` over the first ``record_batches`` batches
  (run again, after the timed pass, because recording costs time);
* for ``code-token`` (teacher-forced, so every variant predicts after the same tokens), the
  fidelity to default Inductor at the same B: per-token KL from Inductor's next-token
  distribution to the variant's (mean and 99th percentile, nats) and top-1 agreement.

Variants are named by a spec (``parse_variant``): a policy (``none``, ``affinity_binning``,
``gate_mass_budget``, ``opportunistic``), optionally with parameters
(``gate_mass_budget:expert_budget=4``, ``affinity_binning:alpha=1.4,beta=2``), or a plan
(``plan:path/to/plan.json``: its sites run its settings, any site it does not name runs none).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch
import transformers

from lynx_compile.config import LynxConfig
from lynx_compile.record import record
from lynx_compile.eval import decode, tasks
from lynx_compile.eval.checkpoints import resolve_checkpoint
from lynx_compile.eval.fidelity import fidelity


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    backend: str | None  # None: not compiled
    options: dict | None = None

    @property
    def policy(self) -> str | None:
        """The policy ("plan" for a plan variant); None for eager and Inductor."""
        options = self.options or {}
        return "plan" if "plan" in options else options.get("policy")


def parse_variant(spec: str) -> Variant:
    """A lynx variant from its spec: "POLICY", "POLICY:key=value[,key=value]" or "plan:PATH".

    Raises ValueError (LynxOptionsError for a bad policy, parameter or plan file)."""
    name, _, rest = spec.partition(":")
    if name == "plan":
        if not rest:
            raise ValueError(f"variant {spec!r}: expected plan:<path to a plan JSON>")
        options = {"plan": rest, "policy": "none"}
    else:
        options = {"policy": name}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"variant {spec!r}: expected POLICY:key=value[,key=value], got {item!r}")
            options[key.strip()] = _number(value.strip())
    LynxConfig.from_options(options)  # validate now, not after other variants ran
    return Variant(f"lynx:{spec}", "lynx", options)


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def variants(policies: list[str], eager: bool = False) -> list[Variant]:
    out = [Variant("eager", None)] if eager else []
    out.append(Variant("inductor", "inductor"))
    out += [parse_variant(spec) for spec in policies]
    return out


def load(path: Path, dtype: torch.dtype, variant: Variant):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if variant.backend is not None:
        model.compile(backend=variant.backend, options=lynx_options(variant, tokenizer))
    return model, tokenizer


def lynx_options(variant: Variant, tokenizer) -> dict | None:
    """The variant's options; for lynx, plus the pad id: generate() feeds finished rows the pad
    token, and those rows must not vote on the experts of the rows still decoding."""
    if variant.backend != "lynx":
        return variant.options
    return {"pad_token_id": tokenizer.pad_token_id, **(variant.options or {})}


def _experts_by_layer(summary: dict) -> dict[str, list[float]]:
    return {site: [round(s["experts_before"], 2), round(s["experts_after"], 2)] for site, s in summary.items()}


def run_task(model, tokenizer, task: str, batch: int, count: int, variant: Variant,
             record_batches: int, progress=None) -> tuple[dict, list, list[bool], torch.Tensor | None]:
    """One (variant, task, B) cell: its row, each problem's output and whether it was correct, and
    for code-token the (N, V) next-token log-probabilities of the timed pass (None otherwise)."""
    distributions = [] if task == "code-token" else None
    if task == "code-token":
        items = tasks.code_token_windows(tokenizer, count)
        prefix, pad_id = tasks.CODE_TOKEN_PREFIX, tokenizer.pad_token_id

        def run(chunk, timer=None, progress=None):
            return decode.teacher_forced_predictions(model, chunk, prefix, batch, pad_id, timer, progress,
                                                     distributions if timer is not None else None)
    else:
        items = tasks.generation_problems(task, tokenizer, count, model.config.max_position_embeddings)
        new_tokens = tasks.max_new_tokens(task)

        def run(chunk, timer=None, progress=None):
            return decode.generate_lines(model, tokenizer, chunk, batch, new_tokens, timer, progress)

    run(items[:batch])  # one untimed batch first: it compiles the graphs this batch size needs
    timer = decode.DecodeStepTimer()
    outputs = run(items, timer, progress)
    recorded = None
    if variant.backend == "lynx" and record_batches:
        with record(model) as recorded:
            run(items[:batch * record_batches])
    if task == "code-token":
        correct = (outputs == items[:, prefix + 1:]).flatten().tolist()
        outputs = outputs.flatten().tolist()
    else:
        correct = [tasks.is_correct(task, out, p.expected) for out, p in zip(outputs, items)]
    step_ms = timer.step_ms
    row = {"variant": variant.name, "policy": variant.policy, "batch": batch, "problems": len(correct),
           "correct": sum(correct), "accuracy": round(sum(correct) / len(correct), 4),
           "step_ms": round(statistics.median(step_ms), 3) if step_ms else None, "decode_steps": len(step_ms)}
    if recorded is not None:
        summary = recorded.summary(decode_only=True)
        layers = _experts_by_layer(summary)
        row["experts_by_layer"] = layers
        if layers:
            row["experts_before"] = round(statistics.mean(b for b, _ in layers.values()), 2)
            row["experts_after"] = round(statistics.mean(a for _, a in layers.values()), 2)
            remapped = {site: round(s["remapped_fraction"], 4) for site, s in summary.items()}
            row["remapped_by_layer"] = remapped
            row["remapped_fraction"] = round(statistics.mean(remapped.values()), 4)
    log_probs = torch.cat(distributions).flatten(0, 1) if distributions else None  # (N, V)
    return row, outputs, correct, log_probs


def add_fidelity(row: dict, reference: torch.Tensor, log_probs: torch.Tensor, baseline: str = "inductor") -> None:
    """Adds ``kl_mean_vs_<baseline>``, ``kl_p99_vs_<baseline>`` (nats per token) and
    ``top1_agreement_vs_<baseline>`` from the same tokens' next-token log-probabilities."""
    measured = fidelity(reference, log_probs)
    row[f"kl_mean_vs_{baseline}"] = round(measured.kl, 6)
    row[f"kl_p99_vs_{baseline}"] = round(measured.kl_p99, 6)
    row[f"top1_agreement_vs_{baseline}"] = round(measured.top1_agreement, 6)


def compare_with_baseline(rows: list[dict], outputs: dict, correct: dict, baseline: str = "inductor") -> None:
    """Adds ``changed_vs_<baseline>`` and ``flipped_vs_<baseline>`` to every row with a baseline."""
    for row in rows:
        key = (row["task"], row["batch"])
        if (baseline, *key) not in outputs:
            continue
        base_out, base_ok = outputs[(baseline, *key)], correct[(baseline, *key)]
        mine_out, mine_ok = outputs[(row["variant"], *key)], correct[(row["variant"], *key)]
        row[f"changed_vs_{baseline}"] = sum(a != b for a, b in zip(mine_out, base_out))
        row[f"flipped_vs_{baseline}"] = sum(a != b for a, b in zip(mine_ok, base_ok))
        base_row = next(r for r in rows if r["variant"] == baseline and (r["task"], r["batch"]) == key)
        row[f"accuracy_delta_points_vs_{baseline}"] = round(100 * (row["accuracy"] - base_row["accuracy"]), 2)
        if row["step_ms"] and base_row["step_ms"]:
            row[f"speedup_vs_{baseline}"] = round(base_row["step_ms"] / row["step_ms"], 3)


# Batch size, prompt length, cache length and generate()'s cache state all vary during an
# evaluation, so each variant legitimately compiles ~10 graphs before its shapes go dynamic
# (measured; dynamic=True from the start compiled slower and no fewer). Past the default limit
# of 8, Dynamo would silently run the rest eagerly and the timings would measure the wrong
# thing: raise the limit, and fail loudly if even that is reached.
DYNAMO_LIMITS = dict(recompile_limit=64, fail_on_recompile_limit_hit=True)


def evaluate(checkpoint: str, task_names: list[str], batch_sizes: list[int], policies: list[str],
             problems: int | dict[str, int], dtype: torch.dtype = torch.float32, eager: bool = False,
             record_batches: int = 2, show_progress: bool = True) -> dict:
    """Run every variant x task x B on one checkpoint; returns the JSON-ready result.
    problems: per task (a dict) or one count for every task; code-token counts predicted tokens."""
    for task in task_names:
        if task not in tasks.TASKS:
            raise ValueError(f"unknown task {task!r}; tasks are {', '.join(tasks.TASKS)}")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive, got {batch_sizes}")
    if not isinstance(problems, dict):
        problems = dict.fromkeys(task_names, problems)
    path = resolve_checkpoint(checkpoint)
    start = time.monotonic()
    with torch._dynamo.config.patch(**DYNAMO_LIMITS):
        rows, model, variant_seconds = _evaluate_variants(path, task_names, batch_sizes, policies, problems, dtype,
                                                          eager, record_batches, show_progress)
    config = model.config
    return {"checkpoint": path.name, "model_type": config.model_type,
            "num_experts": getattr(config, "num_local_experts", None) or config.num_experts,
            "top_k": config.num_experts_per_tok, "dtype": str(dtype).removeprefix("torch."),
            "record_batches": record_batches,
            # compiling included: cold or warm depends on Inductor's cache (TORCHINDUCTOR_CACHE_DIR)
            "wall_seconds": {"total": round(time.monotonic() - start, 1), "by_variant": variant_seconds},
            "rows": rows}


def _evaluate_variants(path, task_names, batch_sizes, policies, problems, dtype, eager, record_batches,
                       show_progress):
    rows, outputs, correct, variant_seconds = [], {}, {}, {}
    reference = {}  # (task, B) -> Inductor's code-token log-probabilities (variants() puts Inductor first)
    for variant in variants(policies, eager):
        start = time.monotonic()
        torch._dynamo.reset()  # each variant compiles from scratch; no cache entries shared across backends
        model, tokenizer = load(path, dtype, variant)
        for task in task_names:
            for batch in batch_sizes:
                steps = tasks.CODE_TOKEN_STEPS
                count = problems[task]
                total = -(-count // steps) * steps if task == "code-token" else count
                progress = _progress(f"{path.name} {variant.name} {task} B={batch}", total, show_progress)
                row, outs, oks, log_probs = run_task(model, tokenizer, task, batch, count, variant,
                                                     record_batches, progress)
                if progress is not None:
                    progress.close()
                row["task"] = task
                if log_probs is not None and variant.name == "inductor":
                    reference[(task, batch)] = log_probs
                elif log_probs is not None and (task, batch) in reference:
                    add_fidelity(row, reference[(task, batch)], log_probs)
                rows.append(row)
                outputs[(variant.name, task, batch)], correct[(variant.name, task, batch)] = outs, oks
        variant_seconds[variant.name] = round(time.monotonic() - start, 1)
    compare_with_baseline(rows, outputs, correct)
    if eager:
        compare_with_baseline(rows, outputs, correct, baseline="eager")
    return rows, model, variant_seconds


def _progress(description: str, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=description, total=total, unit="problem", leave=False)
