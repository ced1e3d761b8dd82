"""lynx in PyTorch's logging: TORCH_LOGS (module form), set_logs with the registered names, and
TORCH_TRACE artifacts for tlparse."""

import logging
import os
import pathlib
import subprocess
import sys

import torch

from lynx_compile import logs
from moe_models import decode_hidden, moe_block

TESTS = pathlib.Path(__file__).resolve().parent
SCRIPT = """
import torch
from moe_models import decode_hidden, moe_block
with torch.no_grad():
    torch.compile(moe_block("mixtral"), backend="lynx")(decode_hidden(8))
"""


def test_torch_logs_prints_decisions_and_graphs_and_torch_trace_keeps_them(tmp_path):
    # the FX graph cache would skip the pass (and so its logs) on a hit, as for Inductor's own
    env = dict(os.environ, TORCH_LOGS="+lynx_compile", TORCH_TRACE=str(tmp_path), TORCHINDUCTOR_FX_GRAPH_CACHE="0",
               TORCHINDUCTOR_AUTOGRAD_CACHE="0",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lynx site gate: routing=True; router=softmax(linear); E=8; k=2; phase=decode; " \
           "policy=moved_mass(max_moved=0.06, ranks=1) [config]; rewritten=True" in done.stderr
    assert "[__lynx_graphs] lynx graph before its pass:" in done.stderr
    after = done.stderr.split("lynx graph after the routing rewrite:")[1].split("lynx graph after lowering:")[0]
    assert "lynx.batch_select.default" in after
    trace = "".join(path.read_text() for path in tmp_path.iterdir())
    for artifact in ("lynx_decisions", "lynx_graph_before", "lynx_graph_after_rewrite", "lynx_graph_after_lowering"):
        assert f'"name": "{artifact}"' in trace


def test_set_logs_takes_the_registered_names():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    target = logging.getLogger("lynx_compile.passes")
    target.addHandler(handler)
    try:
        torch._logging.set_logs(modules={logs.LOG: logging.INFO, logs.GRAPHS: True})
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            torch.compile(moe_block("qwen3_moe"), backend="lynx", options={"policy": "opportunistic"})(decode_hidden(4))
    finally:
        torch._logging.set_logs()
        target.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert any(m.startswith("lynx site gate: ") and "policy=opportunistic(keep_top=2) [config]" in m for m in messages)
    assert any(m.startswith("lynx graph after lowering:") for m in messages)


def test_nothing_is_kept_for_logs_when_no_log_is_on():
    assert not logs.wants_graphs()
