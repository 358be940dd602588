"""The compile cache never runs a stranger's code (mkcompiler/tools/cache.py): entries are data only
(JSON and raw arrays, never unpickled), created owner-only; an entry that does not parse (planted,
truncated, corrupt, foreign, of another version) or a directory others can write to is ignored with
one warning naming the directory, and the model compiles normally, to the right answer."""

import collections
import dataclasses
import enum
import hashlib
import json
import os
import pathlib
import pickle
import stat
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import mkcompiler
from mkcompiler.ir.graph import Buffer, BufferKind
from mkcompiler.tools import cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache directory of its own, and fresh hit/miss counters."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MKCOMPILER_CACHE", str(root))
    cache.stats.clear()
    return root / "compile"


def model() -> torch.nn.Module:
    """Small: each test compiles it several times."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))


def fresh_input() -> torch.Tensor:
    return torch.randn(4, 16)


def check(mk, m) -> None:
    x = fresh_input()
    torch.testing.assert_close(mk(x), m(x), rtol=1e-4, atol=1e-5)


def cache_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "compile cache" in str(w.message)]


def compile_recording(m, **options):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mk = mkcompiler.compile(m, (fresh_input(),), **options)
    return mk, cache_warnings(record)


def signed(rest: bytes) -> bytes:
    """An entry file around `rest` with a valid header and checksum (as a planted file could have)."""
    return cache.MAGIC + hashlib.sha256(rest).hexdigest().encode() + b"\n" + rest


class Planted:
    """Unpickling it creates the marker file: proof that a planted pickle ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_repeated_compiles_hit_with_owner_only_entries_and_no_unpickling(cache_dir, monkeypatch):
    m = model()
    first = mkcompiler.compile(m, (fresh_input(),))
    assert first.compilation.cache == "miss"
    files = sorted(cache_dir.iterdir())
    assert [p.name.split("-")[0] for p in files] == ["graph", "model"]
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert all(p.read_bytes().startswith(cache.MAGIC) for p in files)

    def refuse(*args, **kwargs):
        raise AssertionError("the cache unpickled something")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for n in (1, 2):
        mk = mkcompiler.compile(m, (fresh_input(),))
        assert mk.compilation.cache == "hit" and cache.stats["hit"] == n
        check(mk, m)
    assert (mk.queue.rows == first.queue.rows).all() and mk.source == first.source


@pytest.mark.parametrize("header", ["bare pickle", "valid header and checksum"])
def test_a_planted_pickle_is_never_executed(cache_dir, tmp_path, header):
    m = model()
    mkcompiler.compile(m, (fresh_input(),))
    marker = tmp_path / "planted-code-ran"
    payload = pickle.dumps(Planted(marker))
    for p in cache_dir.iterdir():  # the entries' own names: they would be read
        p.write_bytes(payload if header == "bare pickle" else signed(payload))
        p.with_suffix(".pkl").write_bytes(payload)  # and where the pickle-based cache kept them
    mk, messages = compile_recording(m)
    assert not marker.exists()
    assert mk.compilation.cache == "miss" and cache.stats["corrupt"] >= 1
    assert len(messages) == 1 and str(cache_dir) in messages[0]
    check(mk, m)
    assert mkcompiler.compile(m, (fresh_input(),)).compilation.cache == "hit"  # rewritten
    pickle.loads(payload)  # the planted entry does run code when unpickled: the test can fail
    assert marker.exists()


def foreign_record(data: bytes, kind: str, key: str) -> bytes:
    """A well-formed, checksummed entry naming a class that is not mkcompiler's."""
    value = {"record": ["subprocess:Popen", [["args", ["true"]]]]}
    return signed(json.dumps([cache.FORMAT, kind, key, value]).encode() + b"\n")


def other_version(data: bytes, kind: str, key: str) -> bytes:
    rest = data[len(cache.MAGIC) + 65 :]
    end = rest.index(b"\n")
    doc = json.loads(rest[:end])
    doc[0] += 1
    return signed(json.dumps(doc).encode() + rest[end:])


def malformed_fields(data: bytes, kind: str, key: str) -> bytes:
    """A record of mkcompiler's own class, with the wrong fields."""
    value = {"record": ["mkcompiler.tools.cache:GraphEntry", [["checked", True]]]}
    return signed(json.dumps([cache.FORMAT, kind, key, value]).encode() + b"\n")


CORRUPTIONS = {
    "truncated": lambda data, kind, key: data[: len(data) // 2],
    "flipped byte": lambda data, kind, key: data[:-7] + bytes([data[-7] ^ 0xFF]) + data[-6:],
    "garbage": lambda data, kind, key: os.urandom(300),
    "foreign class": foreign_record,
    "other version": other_version,
    "malformed fields": malformed_fields,
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The model's entries (their keys do not depend on the directory) and its compiled queue."""
    root = tmp_path_factory.mktemp("stored")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MKCOMPILER_CACHE", str(root))
        mk = mkcompiler.compile(model(), (fresh_input(),))
    return {p.name: p.read_bytes() for p in (root / "compile").iterdir()}, mk.queue.rows


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_unreadable_entries_fall_back_to_a_compile(cache_dir, stored, corrupt):
    entries, rows = stored
    cache_dir.mkdir(parents=True, mode=0o700)
    for name, data in entries.items():
        kind, key = name.split(".")[0].split("-", 1)
        (cache_dir / name).write_bytes(CORRUPTIONS[corrupt](data, kind, key))
    m = model()
    mk, messages = compile_recording(m)
    assert mk.compilation.cache == "miss" and cache.stats["corrupt"] >= 1
    assert len(messages) == 1 and str(cache_dir) in messages[0], messages
    assert (mk.queue.rows == rows).all()
    check(mk, m)
    mk = mkcompiler.compile(m, (fresh_input(),))
    assert mk.compilation.cache == "hit"  # the entries were rewritten
    check(mk, m)


@pytest.mark.parametrize("where", ["cache directory", "compile directory", "another owner"])
def test_a_directory_others_can_write_to_is_not_used(cache_dir, monkeypatch, where):
    m = model()
    mkcompiler.compile(m, (fresh_input(),))
    before = {p.name: p.read_bytes() for p in cache_dir.iterdir()}
    unsafe = cache_dir if where == "compile directory" else cache_dir.parent  # the first one checked
    if where == "another owner":
        uid = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    else:
        unsafe.chmod(0o775 if where == "cache directory" else 0o770)
    mk, messages = compile_recording(m)
    assert len(messages) == 1 and str(unsafe) in messages[0], messages
    mk2, messages = compile_recording(m)
    assert messages == []  # one warning, not one per compile
    assert cache.stats["hit"] == 0 and cache.stats["graph hit"] == 0 and cache.stats["unsafe directory"] >= 2
    assert {p.name: p.read_bytes() for p in cache_dir.iterdir()} == before  # nothing written either
    check(mk, m)
    check(mk2, m)


# ---- the entry format ----


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: tuple


Pair = collections.namedtuple("Pair", "first second")


def test_entry_format_round_trip():
    spec = pytree.tree_flatten(({"a": 1, "b": [2, 3]}, (4,), None))[1]
    value = {
        "tuple": (1, 2.5, -0.0, float("inf"), "s", None, True),
        7: [torch.float32, torch.bfloat16, torch.Size([2, 3])],
        "array": np.arange(12, dtype=np.int32).reshape(3, 4),
        "bytes": b"\x00\x01\xff",
        "scalar": np.int64(5),
        "buffer": Buffer(3, "w", 16, torch.float16, BufferKind.PARAM),
        "spec": spec,
    }
    data = cache.encode("graph", "k", value)
    assert b"\x80" not in data.split(b"\n")[2]  # the JSON part is text: no pickle opcodes
    out = cache.decode(data, "graph", "k")
    assert out.keys() == value.keys() and out["tuple"] == value["tuple"] and out[7] == value[7]
    assert np.array_equal(out["array"], value["array"]) and out["array"].dtype == np.int32
    assert out["array"].flags.writeable
    assert out["bytes"] == value["bytes"] and out["scalar"] == 5 and type(out["scalar"]) is np.int64
    assert out["buffer"] == value["buffer"] and out["spec"] == spec
    for foreign in (Color.RED, Point(1, (2,)), Pair(1, 2), lambda: 0, torch.zeros(1)):  # not mkcompiler's
        with pytest.raises(TypeError):
            cache.encode("graph", "k", [foreign])


class Named(torch.nn.Module):
    """Returns a named tuple: its type is part of the stored output spec."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return Pair(self.fc(x), torch.relu(x))


def test_a_named_tuple_output_hits(cache_dir):
    torch.manual_seed(0)
    m = Named()
    mkcompiler.compile(m, (fresh_input(),))
    mk = mkcompiler.compile(m, (fresh_input(),))
    assert mk.compilation.cache == "hit"
    x = fresh_input()
    out, ref = mk(x), m(x)
    assert type(out) is Pair
    torch.testing.assert_close(out.first, ref.first, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.second, ref.second)


def test_a_planted_kernel_file_is_replaced_not_imported(tmp_path, monkeypatch):
    """Generated kernels are imported from the cache root by a name derived from their source: a
    file planted under that name (or a truncated one) is rewritten with the source before import."""
    from mkcompiler.runtime import megakernel

    monkeypatch.setenv("MKCOMPILER_CACHE", str(tmp_path))
    source = "VALUE = 42\n"
    name = f"mkcompiler_kernel_{hashlib.sha256(source.encode()).hexdigest()[:16]}"
    marker = tmp_path / "planted-ran"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nVALUE = 0\n")
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = megakernel.load_source(source)
    assert module.VALUE == 42 and not marker.exists()
    assert (tmp_path / f"{name}.py").read_text() == source
    assert (tmp_path / f"{name}.py").stat().st_mode & 0o077 == 0
    monkeypatch.delitem(sys.modules, name, raising=False)
