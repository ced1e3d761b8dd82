"""Older-torch paths (compat.py) exercised on CI's torch: hooks that hold one pass, size hints."""

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from lynx_compile import compat
from lynx_compile.config import LynxConfig
from lynx_compile.passes import pass_manager
from lynx_compile.passes.pass_manager import ChainedPasses, LynxPostGradPass, inductor_patches
from moe_models import PassOnlyBackend, count_ops, decode_hidden, moe_block


class RecordingPass(CustomGraphPass):
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __call__(self, graph):
        self.log.append((self.name, count_ops(graph)["lynx.moe_experts.default"]))

    def uuid(self):
        return self.name


def test_a_single_pass_hook_gets_one_chain_that_runs_the_user_pass_then_lynx(monkeypatch):
    monkeypatch.setattr(pass_manager, "CUSTOM_PASS_LISTS", False)  # torch < 2.13: one pass per hook
    log = []
    user_pass = RecordingPass(log, "user")
    lynx_pass = LynxPostGradPass(LynxConfig(experts="fused"))
    with torch._inductor.config.patch(post_grad_custom_pre_pass=user_pass):
        [(hook, chained)] = inductor_patches(lynx_pass).items()
    assert hook == "post_grad_custom_pre_pass" and isinstance(chained, ChainedPasses)
    chained.passes.append(RecordingPass(log, "after"))
    backend = PassOnlyBackend()
    backend.lynx_pass = chained  # compile as Inductor would hand the graph to the chain
    with torch.no_grad():
        torch.compile(moe_block("mixtral"), backend=backend)(decode_hidden(4))
    assert log == [("user", 0), ("after", 1)]  # the user's pass first, then lynx fused the experts
    assert chained.uuid() == ("user", lynx_pass.uuid(), "after")
    assert ChainedPasses([user_pass, lambda graph: None]).uuid() is None  # a plain callable: no caching


def test_nothing_configured_gives_lynx_alone_on_single_pass_hooks(monkeypatch):
    monkeypatch.setattr(pass_manager, "CUSTOM_PASS_LISTS", False)
    lynx_pass = LynxPostGradPass(LynxConfig())
    with torch._inductor.config.patch(post_grad_custom_pre_pass=None):
        assert inductor_patches(lynx_pass) == {"post_grad_custom_pre_pass": lynx_pass}


def test_the_last_resort_size_hint_reads_a_symbolic_size_without_a_guard():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv()
    symbol = shape_env.create_symbol(7, source=ConstantSource("T"), dynamic_dim=DimDynamic.DYNAMIC)
    size = shape_env.create_symintnode(symbol, hint=7)
    assert compat.example_size(size) == 7 and compat.example_size(5) == 5
    assert compat.optimization_hint(size) == 7  # whichever implementation this torch has
    assert not shape_env.guards


_OLDER_TORCH = """
import torch
import torch._inductor.compile_fx, torch._inductor.pattern_matcher  # torch's own modules keep theirs
import torch.fx.experimental.symbolic_shapes as symbolic_shapes
import torch._inductor.custom_graph_pass as custom_graph_pass
del symbolic_shapes.optimization_hint, custom_graph_pass.get_custom_graph_passes  # as on torch 2.11
import lynx_compile
from lynx_compile import compat
from lynx_compile.config import LynxConfig
from lynx_compile.passes.pass_manager import ChainedPasses, LynxPostGradPass, inductor_patches
assert compat.optimization_hint is compat.example_size and not compat.CUSTOM_PASS_LISTS
user_pass = ChainedPasses([])
with torch._inductor.config.patch(post_grad_custom_pre_pass=user_pass):
    [hook] = inductor_patches(LynxPostGradPass(LynxConfig())).values()
assert isinstance(hook, ChainedPasses) and hook.passes[0] is user_pass
print("OK")
"""


def test_the_package_imports_where_torch_lacks_both_newer_apis():
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _OLDER_TORCH], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stdout + result.stderr[-3000:]
