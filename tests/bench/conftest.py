"""The benches are scripts in bench/, not a package: `load_bench(name)` imports one the way it runs
(bench/ and examples/ on the path for its `common`, `policy_frontier` and `small_model` imports)."""

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    for folder in (BENCH, BENCH.parent / "examples"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_bench():
    """load_bench("bench_experts") -> the bench's module."""
    return _load
