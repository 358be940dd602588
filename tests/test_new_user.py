"""Rough edges a new user hit (issue 20, part 3): an optional package's message names its extra,
factories load from anywhere, one input error family for lists and arrays, an unsupported-op
error that lists every such op and what to do, and VM profiles whose shares and gaps add up."""

import builtins
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mkcompiler
from mkcompiler.errors import InputError, InputTypeError, MissingExtraError
from mkcompiler.tools.cli import load_factory, main
from mkcompiler.tools.profiling import Profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.basename(__file__)


# ---- profile without matplotlib ----


def test_profile_without_matplotlib_writes_the_trace_and_names_the_extra(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out_dir = tmp_path / "prof"
    assert main(["profile", "examples.factories:mlp", "--out", str(out_dir), "--vm"]) == 0
    out = capsys.readouterr().out
    assert (out_dir / "trace.json").exists() and not (out_dir / "gantt.png").exists()
    assert 'pip install "mkcompiler[profile]"' in out and "per op kind" in out, out


def test_missing_extra_error_is_a_module_not_found_error_naming_the_extra():
    e = MissingExtraError("matplotlib", "profile", "Gantt charts")
    assert isinstance(e, ModuleNotFoundError) and e.name == "matplotlib"
    assert 'pip install "mkcompiler[profile]"' in str(e)


# ---- factories from anywhere ----


def test_dotted_factory_loads_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", REPO, os.getcwd())])
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        monkeypatch.delitem(sys.modules, name)
    assert callable(load_factory("examples.factories:mlp"))


def test_factory_file_path_imports_its_siblings_from_another_directory(tmp_path):
    """examples/factories.py imports examples.llama: a path to it works from any directory (in a fresh
    process: nothing of the repository on sys.path)."""
    path = os.path.join(REPO, "examples", "factories.py")
    code = f"from mkcompiler.tools.cli import load_factory; print(load_factory({path + ':mlp'!r}).__module__)"
    env = {**os.environ, "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "examples.factories"


def test_factory_file_in_a_package_imports_its_package(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("WIDTH = 8\n")
    (pkg / "facts.py").write_text("from mypkg.models import WIDTH\n\ndef width():\n    return WIDTH\n")
    assert load_factory(f"{pkg / 'facts.py'}:width")() == 8


def test_unimportable_factory_is_one_line_naming_what_was_tried(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "no_such_package.factories:mlp", "--no-offline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import no_such_package.factories" in err and str(tmp_path) in err, err
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    assert main(["inspect", f"{broken}:mlp", "--no-offline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_module_anywhere" in err and "tried with" in err, err
    assert main(["inspect", f"{tmp_path / 'missing.py'}:mlp", "--no-offline"]) == 2
    assert "no file" in capsys.readouterr().err


# ---- input errors ----


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.proj(x))


class Sandwich(torch.nn.Module):
    """A supported op, one that is not (cumsum), another one that is not (sort), a supported op."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        h = torch.cumsum(self.proj(x), dim=-1)
        h = torch.sort(h, dim=-1).values
        return torch.relu(h)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return mkcompiler.compile(Small(), (torch.randn(4, 16),))


@pytest.fixture(scope="module")
def segmented():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        return mkcompiler.compile(Sandwich(), (torch.randn(4, 16),), fallback="eager")


BAD_CALLS = {
    "python_list": (lambda x: (x.tolist(),), InputTypeError, "got list of 4 items"),
    "numpy_array": (lambda x: (x.numpy(),), InputTypeError, "got numpy.ndarray of shape (4, 16)"),
    "tensor_in_a_list": (lambda x: ([x],), InputTypeError, "got list of 1 item"),
    "two_tensors": (lambda x: (x, x), InputError, "got 2"),
}


@pytest.mark.parametrize("model", ["small", "segmented"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_one_error_family_saying_what_was_passed(model, case, request):
    mk = request.getfixturevalue(model)
    make, error, fact = BAD_CALLS[case]
    with pytest.raises(error) as info:
        mk(*make(torch.randn(4, 16)))
    assert isinstance(info.value, InputError) and fact in str(info.value), str(info.value)
    assert "input 0 ('x')" in str(info.value) or "(x)" in str(info.value), str(info.value)


def test_non_tensor_input_errors_are_also_type_errors(small):
    with pytest.raises(TypeError):
        small(np.zeros((4, 16), dtype=np.float32))


# ---- unsupported ops ----


def test_unsupported_op_error_lists_every_op_once_with_source_and_what_to_do():
    with pytest.raises(mkcompiler.UnsupportedOpError) as info:
        mkcompiler.compile(Sandwich(), (torch.randn(4, 16),))
    message = str(info.value)
    lines = message.splitlines()
    assert message.count("aten.cumsum") == 1 and HERE in lines[0], message  # the op once, with its source line
    sort_line = next(ln for ln in lines if "aten.sort" in ln)
    assert HERE in sort_line and "torch.sort" in sort_line, message
    assert 'fallback="eager"' in message and "python -m mkcompiler ops" in message, message
    assert max(map(len, lines)) < 200, message  # no line of ~130 op names


def test_ops_command_lists_supported_ops_one_per_column(capsys):
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    assert "aten.mm.default" in out and "aten.cumsum.default" not in out
    assert 'fallback="eager"' in out and max(map(len, out.splitlines())) < 120


# ---- VM profile accounting ----


def test_vm_profile_shares_are_within_the_span_and_gaps_are_not_negative(small):
    """Fetch-ahead (dynamic schedule) takes the next instruction while the worker still runs one."""
    from mkcompiler.tools.profiling import profile_vm

    assert small.settings.schedule != "static"
    prof = profile_vm(small, torch.randn(4, 16), warmup=0)
    ok, worker, fetch, ready, end, _ = prof._times()
    span = prof.span()
    for w in set(worker[ok].tolist()):
        sel = ok & (worker == w)
        assert (end[sel] - fetch[sel]).sum() <= span * (1 + 1e-9)  # waits and runs of one worker tile its time
    summary = prof.summary()
    shares = [
        float(v)
        for ln in summary.splitlines()
        if ln.split()[:1] in (["working"], ["waiting"], ["idle"]) and ln.endswith("%")
        for v in ln.replace("%", "").split()[1:]
    ]
    assert shares and all(0.0 <= v <= 100.0 for v in shares), summary
    assert "between instructions (end to next fetch): total -" not in summary, summary


def test_overlapping_fetch_ahead_stamps_are_clamped():
    """Synthetic stamps: worker 0 fetches instruction 1 (t=1) while instruction 0 runs (ready 1, end 5)."""
    from mkcompiler.ir.layout import StampField

    class FakeQueue:
        def __len__(self):
            return 2

    stamps = np.full((2, len(StampField)), -1, dtype=np.int64)
    for i, (f, r, e) in enumerate([(0, 1, 5), (1, 7, 9)]):
        stamps[i, StampField.FETCH], stamps[i, StampField.READY], stamps[i, StampField.END] = f, r, e
        stamps[i, StampField.WORKER] = 0
    prof = Profile(FakeQueue(), stamps, "ns", "vm")
    _, _, fetch, ready, end, _ = prof._times()
    assert fetch.tolist() == [0, 5] and (ready - fetch).tolist() == [1, 2]
