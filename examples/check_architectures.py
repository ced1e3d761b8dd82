"""Decode step of every supported architecture x experts implementation x dtype, lynx vs Inductor.

    python examples/check_architectures.py            # full matrix, one fresh interpreter per case

For each case a fresh interpreter builds a tiny model from the real transformers config class
(random weights), runs one decode step (B=8) with default `torch.compile` and with
`backend="lynx"` (selected by name), and reports graph breaks, graphs compiled, and whether the
logits are finite. (That the name alone works without importing lynx_compile is checked by
tests/test_backend.py; here the test helpers import it.) Exit status 1 if any case errors or has
more graph breaks under lynx than under default Inductor.
"""

import json
import subprocess
import sys
import textwrap

ARCHS = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")
EXPERTS_IMPLS = ("eager", "batched_mm", "grouped_mm")
DTYPES = ("float32", "bfloat16")

CASE = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "tests")
    from torch._dynamo.utils import counters
    from moe_models import tiny_model, decode_ids
    arch, impl, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    model = tiny_model(arch, experts_impl=impl, dtype=dtype)
    ids = decode_ids(8)
    result = {}
    with torch.no_grad():
        for backend in ("inductor", "lynx"):
            torch._dynamo.reset(); counters.clear()
            logits = torch.compile(model, backend=backend)(ids).logits
            result[backend] = {"graph_breaks": sum(counters["graph_break"].values()),
                               "graphs": counters["stats"]["unique_graphs"],
                               "finite": bool(torch.isfinite(logits).all())}
    print("RESULT " + json.dumps(result))
""")


def main() -> int:
    failures = 0
    print(f"{'arch':<12}{'experts':<12}{'dtype':<10}{'breaks inductor/lynx':>22}{'graphs':>10}  status")
    for arch in ARCHS:
        for impl in EXPERTS_IMPLS:
            for dtype in DTYPES:
                run = subprocess.run([sys.executable, "-c", CASE, arch, impl, dtype],
                                     capture_output=True, text=True)
                lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
                if run.returncode or not lines:
                    failures += 1
                    print(f"{arch:<12}{impl:<12}{dtype:<10}  ERROR {run.stderr.strip().splitlines()[-1:]}")
                    continue
                result = json.loads(lines[-1][len("RESULT "):])
                ind, lyn = result["inductor"], result["lynx"]
                ok = lyn["graph_breaks"] <= ind["graph_breaks"] and lyn["finite"] and ind["finite"]
                failures += not ok
                print(f"{arch:<12}{impl:<12}{dtype:<10}{ind['graph_breaks']:>11}/{lyn['graph_breaks']:<10}"
                      f"{ind['graphs']:>5}/{lyn['graphs']:<4}  {'ok' if ok else 'FAIL'}", flush=True)
    print(f"{failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
