"""Every policy setting on one compiled graph: held-out code-token fidelity, arith answers and the
experts each decode step reads, per batch size (issue 20's frontier search).

The checkpoint is compiled once with every decode routing site switchable
(`lowering/switch_select.py`, the graph calibration measures through), so a setting costs its
decode passes and no compile. Per B and setting, applied at every site:

  code-token  teacher-forced held-out windows (`tasks.code_token_windows`), B windows stepping
              together: mean KL and top-1 agreement against policy none on the same tokens
              (`eval/fidelity.py`), and distinct experts per decode step (`record()`);
  arith       held-out problems greedily decoded through `generate()`, B at a time: accuracy and
              the answers that flip right <-> wrong against policy none.

`lynx-compile eval` remains the reference for the shipped tables (the deployed, non-switchable
graph, with its step times); this script is the quick way to put many settings side by side.

    python bench/policy_frontier.py --checkpoint coarse --batch-sizes 16 32 64 \
        --settings none affinity_binning opportunistic:keep_top=1 protected_mass:keep_mass=0.8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from common import RESULTS, pyplot
from lynx_compile import machine
from lynx_compile.calibration.measure import decode_log_probs
from lynx_compile.calibration.procedure import DYNAMO_LIMITS, switchable_backend
from lynx_compile.config import LynxConfig
from lynx_compile.eval import decode, harness, tasks
from lynx_compile.eval.checkpoints import resolve_checkpoint
from lynx_compile.eval.fidelity import fidelity
from lynx_compile.lowering.switch_select import use_settings
from lynx_compile.policies import SiteSetting, resolve_parameters
from lynx_compile.record import record

FRONTIER = RESULTS / "frontier"


def parse_setting(spec: str) -> tuple[str, dict]:
    """"policy" or "policy:key=value[,key=value]" (the eval's --policies spelling)."""
    variant = harness.parse_variant(spec)
    options = dict(variant.options or {})
    return options.pop("policy", "none"), options


def site_settings(spec: str, sites: dict[str, tuple[int, int]]) -> dict[str, SiteSetting]:
    """Each site's setting: one setting at every site, or a plan's ("plan:PATH"; sites it does not
    name run plain top-k)."""
    if spec.startswith("plan:"):
        config = LynxConfig(policy="none", plan=spec.removeprefix("plan:"))
        return {site: config.site_setting(site, e, k) for site, (e, k) in sites.items()}
    policy, params = parse_setting(spec)
    return {site: SiteSetting(policy, tuple(resolve_parameters(policy, params, e, k, site).items()), "frontier")
            for site, (e, k) in sites.items()}


def switchable_checkpoint(checkpoint: str, code_tokens: int):
    """(model, tokenizer, windows, prefix): a shipped checkpoint in fp32 compiled once with every
    decode routing site switchable, and its held-out code windows, (N, prefix + steps) token ids."""
    path = resolve_checkpoint(checkpoint)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model.compile(backend=switchable_backend(LynxConfig(pad_token_id=tokenizer.pad_token_id)))
    prefix = tasks.CODE_TOKEN_PREFIX
    windows = tasks.code_token_windows(tokenizer, code_tokens)[:, :prefix + tasks.CODE_TOKEN_STEPS]
    return model, tokenizer, windows, prefix


def measure(checkpoint: str, batch_sizes: list[int], specs: list[str], code_tokens: int, arith_problems: int,
            log=print) -> dict:
    model, tokenizer, windows, prefix = switchable_checkpoint(checkpoint, code_tokens)
    problems = tasks.arith_problems(tokenizer, arith_problems)
    sites: dict[str, tuple[int, int]] = {}
    rows = []
    started = time.perf_counter()
    for batch in batch_sizes:
        batches = list(windows.split(batch))
        reference = reference_correct = None
        for spec in specs:
            settings = site_settings(spec, sites)
            with torch._dynamo.config.patch(**DYNAMO_LIMITS), use_settings(model, settings), record(model) as rec:
                log_probs = decode_log_probs(model, model.config, batches, prefix)
            summary = rec.summary(decode_only=True)
            if not sites:
                sites.update({s: (int(v["num_experts"]), int(v["top_k"])) for s, v in summary.items()})
                if spec != "none":
                    raise SystemExit("the first setting must be none (it names the sites and is the reference)")
            with torch._dynamo.config.patch(**DYNAMO_LIMITS), use_settings(model, settings):
                lines = decode.generate_lines(model, tokenizer, problems, batch, tasks.ARITH_MAX_NEW_TOKENS)
            correct = [tasks.is_correct("arith", line, p.expected) for line, p in zip(lines, problems)]
            if reference is None:
                reference, reference_correct = log_probs, correct
            fid = fidelity(reference, log_probs)
            before = sum(v["experts_before"] for v in summary.values()) / len(summary)
            after = sum(v["experts_after"] for v in summary.values()) / len(summary)
            row = {"batch": batch, "setting": spec, **fid.as_dict(), "experts_before": round(before, 3),
                   "experts_after": round(after, 3), "cut": round(1 - after / before, 4),
                   "arith": round(sum(correct) / len(correct), 4),
                   "arith_points": round(100 * (sum(correct) - sum(reference_correct)) / len(correct), 2),
                   "right_to_wrong": sum(r and not c for r, c in zip(reference_correct, correct)),
                   "wrong_to_right": sum(c and not r for r, c in zip(reference_correct, correct))}
            rows.append(row)
            log(f"{checkpoint} B={batch:3d} {spec:42s} experts {before:5.2f} -> {after:5.2f} "
                f"(cut {row['cut']:6.1%})  top-1 {fid.top1_agreement:6.1%}  KL {fid.kl:.4f}  "
                f"arith {row['arith_points']:+5.1f} (+{row['wrong_to_right']}/-{row['right_to_wrong']})  "
                f"[{time.perf_counter() - started:.0f} s]")
    return {"checkpoint": checkpoint, "code_tokens": int(windows.shape[0] * tasks.CODE_TOKEN_STEPS),
            "arith_problems": len(problems), "rows": rows, "seconds": round(time.perf_counter() - started, 1)}


def family(setting: str) -> str:
    return "plans" if setting.startswith("plan:") else setting.partition(":")[0]


def on_front(row: dict, rows: list[dict]) -> bool:
    """No other setting at the same B reads fewer experts at equal or better top-1 agreement."""
    return not any(o is not row and o["batch"] == row["batch"] and o["experts_after"] < row["experts_after"]
                   and o["top1_agreement"] >= row["top1_agreement"] for o in rows)


def markdown(result: dict) -> str:
    """One table per checkpoint, rows by B then experts read (the shipped docs' table)."""
    lines = [f"**{result['checkpoint']}**: {result['code_tokens']} held-out code tokens (teacher-forced) and "
             f"{result['arith_problems']} held-out arith problems per cell; fidelity and answers against policy none "
             "at the same B", "",
             "| B | setting | experts/step | cut | top-1 agreement | KL mean | KL p99 | arith d points (+/-) | front |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(result["rows"], key=lambda r: (r["batch"], r["experts_after"])):
        lines.append(f"| {r['batch']} | {r['setting']} | {r['experts_after']:.2f} of {r['experts_before']:.2f} | "
                     f"{r['cut']:.1%} | {r['top1_agreement']:.1%} | {r['kl']:.4f} | {r['kl_p99']:.3f} | "
                     f"{r['arith_points']:+.1f} (+{r['wrong_to_right']}/-{r['right_to_wrong']}) | "
                     f"{'yes' if on_front(r, result['rows']) else ''} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Per B: top-1 agreement and arith points against experts read; one line per policy family."""
    plt = pyplot()
    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 9), squeeze=False)
    for column, batch in enumerate(batches):
        rows = [r for r in result["rows"] if r["batch"] == batch]
        for line, (key, label, scale) in enumerate((("top1_agreement", "code-token top-1 agreement (%)", 100),
                                                    ("arith_points", "arith points vs none", 1))):
            axis = axes[line][column]
            for name in sorted({family(r["setting"]) for r in rows} - {"none"}):
                points = sorted((r for r in rows if family(r["setting"]) in (name, "none")),
                                key=lambda r: r["experts_after"])
                axis.plot([r["experts_after"] for r in points], [scale * r[key] for r in points], marker="o",
                          label=name)
            axis.set(xlabel="distinct experts per decode step", ylabel=label,
                     title=f"{result['checkpoint']}, B={batch}")
            axis.grid(alpha=0.3)
        axes[0][column].axhline(95, color="gray", linestyle=":")
        axes[1][column].axhline(-1, color="gray", linestyle=":")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="coarse")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--settings", nargs="+", help="the first must be none")
    p.add_argument("--report", action="store_true", help="only redraw the tables and plots from the JSON files")
    p.add_argument("--code-tokens", type=int, default=1024, help="predicted code tokens per setting and B")
    p.add_argument("--arith", type=int, default=500, help="held-out arith problems per setting and B")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=FRONTIER)
    args = p.parse_args(argv)
    if args.report:
        for path in sorted(args.out.glob("frontier_*.json")):
            result = json.loads(path.read_text())
            path.with_suffix(".md").write_text(markdown(result) + "\n")
            plot(result, path.with_suffix(".png"))
            print(f"wrote {path.with_suffix('.md')} and {path.with_suffix('.png')}")
        return
    if not args.settings:
        p.error("--settings is required (unless --report)")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    result = {"machine": machine.describe(), **measure(args.checkpoint, args.batch_sizes, args.settings,
                                                        args.code_tokens, args.arith)}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"frontier_{args.checkpoint}.json"
    previous = json.loads(out.read_text())["rows"] if out.exists() else []
    keep = {(r["batch"], r["setting"]) for r in result["rows"]}
    result["rows"] = [r for r in previous if (r["batch"], r["setting"]) not in keep] + result["rows"]
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and its .md and .png")


if __name__ == "__main__":
    main()
