"""What every benchmark here shares: the results folder, timing, the machine line, saving, plotting,
the command-line prologue, and the random-weight blocks with trained-like router spread.

Each bench measures its variants in one process, one after another, and reports ratios between
variants of the same run; the machine it ran on (ISA, kernel path, read bandwidth measured in the
same run) is stored with every JSON and printed above every table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import time

import torch
import transformers

from lynx_compile import machine

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROUTER_LOGIT_STD = 1.5  # router logit spread of the random blocks (top-1 probability ~0.4 of 8)


def start(description: str, add_arguments=None) -> tuple[argparse.Namespace, dict]:
    """Parse --quick (and what `add_arguments(parser)` adds), give Dynamo room for the several
    backends that compile the same code objects, describe and print the machine."""
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    info = machine.describe()
    print(f"machine: {info}", flush=True)
    return args, info


def time_call(fn, *args, repeats: int) -> float:
    """Median milliseconds of `repeats` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn(*args)
    samples = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples) * 1e3


def machine_line(info) -> str:
    """The machine, as the first line of a bench's markdown table (from lynx_compile.machine.describe())."""
    return (f"Machine: {info['cpu_features']}, {info['cores']} cores, kernel path `{info['lynx_cpu_kernel']}`, "
            f"read bandwidth {info['read_bandwidth_gbs']} GB/s, torch {info['torch']}, "
            f"transformers {info['transformers']}.")


def per_isa(stem: str, info: dict) -> str:
    """A results stem that names the CPU, e.g. "bench_experts.AVX512+bf16+amx": the expert-compute
    benches keep one table per ISA met, so a session on another CPU adds a table, never overwrites."""
    return f"{stem}.{info['cpu_features']}"


def save_results(stem, info, rows, plot_rows):
    """bench/results/<stem>.json (machine + rows) and <stem>.png (drawn by `plot_rows`)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    plot_rows(rows, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / f'{stem}.json'} and {RESULTS / f'{stem}.png'}")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spread_routers(model: torch.nn.Module, hidden_size: int) -> None:
    """Router weights with a trained-like logit spread instead of transformers' near-zero init,
    under which every expert ties and selection would be trivially maximal."""
    for name, param in model.named_parameters():
        if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
            torch.nn.init.normal_(param, std=ROUTER_LOGIT_STD / hidden_size ** 0.5)


def mixtral_block(hidden=1024, intermediate=2816, experts=8, top_k=2):
    """A Mixtral-shaped MoE block (transformers' own class), bf16, random weights, eval mode."""
    config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=intermediate,
                                        num_local_experts=experts, num_experts_per_tok=top_k)
    config._experts_implementation = "grouped_mm"  # transformers' default, set by from_pretrained
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
    torch.nn.init.normal_(block.experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(block.experts.down_proj, std=0.02)
    spread_routers(block, hidden)
    return block.to(torch.bfloat16).eval()


def calls_in(code: str) -> int:
    """Kernel launches and library calls in Inductor's generated wrapper's call(): generated
    kernels, extern kernels and torch ops (how the selection's cost per site is counted)."""
    body = code[code.index("def call("):]
    for end in ("\nrunner = ", "\n\n\n"):
        if end in body:
            body = body[:body.index(end)]
            break
    pattern = r"^\s+(?:\w+ = )?(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?)\("
    return len(re.findall(pattern, body, flags=re.MULTILINE))
