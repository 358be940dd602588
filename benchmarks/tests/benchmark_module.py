"""benchmarks/<name>.py loaded as a module for the benchmark CLI tests."""

import importlib.util
import sys
from pathlib import Path


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is no package), registered in sys.modules
    (dataclasses look their module up there)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
