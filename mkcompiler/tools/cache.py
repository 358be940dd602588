"""The on-disk compile cache: compiled queues reused across processes.

What is stored: the result of the pass pipeline (passes/pipeline.Compilation) without any
tensor of the model: the op graph after the passes (buffers, ops, views, inputs, outputs),
the DAG (compactly; rebuilt when first used), the schedule and the encoded queue. For each
parameter buffer the entry records where its tensor comes from: a module parameter or
buffer by name (re-bound from the live model at every load, so new weight values are used
and KV caches are still updated in place), or, for constants folded at capture (masks,
position tables: values fixed by the code and the shapes), their bytes.

Entries live in MKCOMPILER_CACHE (default ~/.cache/mkcompiler) under compile/, one file per key:
data only (JSON and raw arrays, see "the entry format" below; no pickle: reading an entry runs
nothing from it), with a sha256 of its contents in the header. An entry that does not parse
(truncated, corrupt, of another version, a file someone else put there) is ignored with a
warning: the model is compiled again and the entry rewritten. Entries are created owner-only
(files 0600, compile/ 0700); a cache directory that another user could write to (group or
others may write, or another owner) is not used at all, with a warning. Writes go to a
temporary file first, then os.replace, so concurrent compiles never read half an entry.

Two keys lead to an entry.

- The graph key, always correct: a hash of the captured graph (every op, kind, attribute,
  view shape/stride/offset/dtype, buffer kind, input and output spec, the bytes of folded
  constants; not weight values) and of the environment: Settings.key() (with the target,
  Settings.interpret), num_workers, device, the torch / triton / numpy / networkx / Python versions and a hash of
  mkcompiler's own source files (any code change invalidates everything). A hit skips the
  passes but not capture (torch.export), which takes seconds for a 1B model.

- The model key, which skips capture too. A key built statically (module classes, their
  source, attribute reprs) would be unsafe: forward can read globals, helper functions in
  other files, torch flags, closures, hooks. Instead the model runs once under FakeTensorMode
  (no real compute, no real tensor touched: parameters and inputs are fake copies; ~0.4 s
  for Llama-3.2-1B decode on a CPU core), with the flags torch.export sets (is_exporting), and every
  torch-level call (torch functions and Tensor methods, before decomposition, as export
  records them) and every ATen op it dispatches is recorded: the function, the data flow
  (which parameter, input or earlier result each tensor argument is), every tensor's shape,
  strides, offset, dtype and device, and every non-tensor argument by value (a real tensor
  made in forward is hashed by its bytes). Whatever a global, an attribute or a flag changes
  in the traced program changes that record; the same record means torch.export sees the
  same calls on the same metadata, so it builds the same graph. The key also holds the
  module tree (class names, training flags, hooks, plain attribute values), every parameter
  and buffer's name, shape, strides, dtype, device and aliasing (tied weights), the inputs'
  structure, grad mode and the default dtype, and the environment above.
  The fast path is refused (capture runs, the graph key decides) when the trace fails (data
  dependent control flow, a real tensor attribute or global used in forward: its values could
  change in place), when forward changes module attributes while it runs (Python side
  effects: capture then refuses the model, frontend/checks.py; the trace undoes what forward
  assigned, as torch.export does), or when an argument cannot be recorded by value.
  Residual risk: forward code that takes a different torch call on the same data only when
  exporting, by means this trace does not set (not torch.compiler.is_exporting()). With
  MKCOMPILER_DEBUG=1 every model-key hit is checked: capture runs anyway and must give the
  entry's graph key. `cache=False` turns the cache off for one compile. OpNode.source (the
  user source line, for error messages) is not part of any key: after a hit it may name the
  line of an earlier version of the file.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import hashlib
import json
import os
import stat
import sys
import tempfile
import warnings
from collections import Counter

import numpy as np
import torch
import torch.utils._pytree as pytree

from mkcompiler.frontend.capture import bound_tensor
from mkcompiler.frontend.checks import plain_value
from mkcompiler.ir.dag import TileDAG, TileTask
from mkcompiler.ir.graph import Graph, View
from mkcompiler.ops import registry
from mkcompiler.passes.pipeline import Compilation
from mkcompiler.runtime.megakernel import cache_dir

FORMAT = 3  # the entry format (see "the entry format" below); part of every key
MAGIC = b"mkcompiler compile cache, data only\n"
stats: Counter = Counter()  # "hit", "graph hit", "miss", "store", "corrupt", "untraceable": for tests and reports


# ---- environment ----


def _package_files() -> list[tuple[str, str]]:
    import mkcompiler
    import mkcompiler.ops
    import mkcompiler.passes

    dirs = [("mkcompiler", os.path.dirname(mkcompiler.__file__))]
    dirs += [("ops", d) for d in mkcompiler.ops.__path__] + [("passes", d) for d in mkcompiler.passes.__path__]
    return [(tag, os.path.join(d, n)) for tag, d in dirs for n in sorted(os.listdir(d)) if n.endswith(".py")]


@functools.cache
def source_digest() -> str:
    """sha256 of mkcompiler's source files (package, ops/, passes/) as this process loaded them."""
    h = hashlib.sha256()
    for tag, path in _package_files():
        h.update(f"{tag}/{os.path.basename(path)}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@functools.cache
def _versions() -> tuple:
    import networkx
    import triton

    try:
        from importlib.metadata import version

        mine = version("mkcompiler")
    except Exception:
        mine = "unknown"
    return (
        mine,
        torch.__version__,
        triton.__version__,
        np.__version__,
        networkx.__version__,
        sys.version_info[:2],
    )


def environment(settings, num_workers: int, device: torch.device) -> tuple:
    """Everything besides the graph that the queue and the generated kernel depend on (the target,
    Settings.interpret, is in settings.key())."""
    dev = (device.type,)
    if device.type == "cuda":
        dev += (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    return (FORMAT, _versions(), source_digest(), settings.key(), num_workers, dev)


def _digest(obj) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()


# ---- the graph key ----


def _module_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return tensors


def _span(t: torch.Tensor, numel: int) -> torch.Tensor:
    """The `numel` elements a buffer spans from the tensor's first element, flat, on the CPU."""
    return torch.as_strided(t.detach(), (numel,), (1,)).cpu().contiguous()


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def param_sources(graph: Graph, model: torch.nn.Module) -> dict[int, tuple]:
    """Where each parameter buffer's tensor comes from: ("model", name) for a module parameter
    or buffer; ("data", bytes) for a constant the capture made (its values follow from the
    code); ("capture",) for anything else (a plain tensor attribute, read in place: only a
    fresh capture can bind it)."""
    tensors = _module_tensors(model)
    sources = {}
    for bid, t in graph.params.items():
        buf = graph.buffers[bid]
        if buf.name in tensors:
            sources[bid] = ("model", buf.name)
        elif isinstance(_attribute(model, buf.name), torch.Tensor):
            sources[bid] = ("capture",)
        else:
            try:
                sources[bid] = ("data", _bytes(_span(t, buf.numel)))
            except Exception:  # nothing to store: only a capture can bind it
                sources[bid] = ("capture",)
    return sources


def _attribute(model, path: str):
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _describe(x):
    """A stable description of graph contents: views and dataclasses field by field."""
    if isinstance(x, View):
        return ("view", x.buffer, str(x.dtype), x.shape, x.strides, x.offset)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        # OpNode.source (the user's line, for error messages) is left out: see the module docstring.
        fields = [(f.name, _describe(getattr(x, f.name))) for f in dataclasses.fields(x) if f.name != "source"]
        return (type(x).__qualname__, fields)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_describe(v) for v in x])
    if isinstance(x, dict):
        return ("dict", [(_describe(k), _describe(v)) for k, v in x.items()])
    if isinstance(x, torch.Tensor):
        raise TypeError("tensors are described by graph_key")
    return repr(x)  # ints, floats, dtypes, enums, strings, tree specs


def graph_key(graph: Graph, env: tuple, sources: dict[int, tuple]) -> str | None:
    """Hash of the captured graph (every field of every buffer, op and view; parameter tensors by
    metadata, folded constants by value) and of the environment; None if the graph holds
    something it cannot describe (then the compile does not use the cache)."""
    try:
        return _graph_key(graph, env, sources)
    except Exception:
        stats["undescribable"] += 1
        return None


def _graph_key(graph: Graph, env: tuple, sources: dict[int, tuple]) -> str:
    params = []
    for bid, t in sorted(graph.params.items()):
        src = sources[bid]
        data = hashlib.sha256(src[1]).hexdigest() if src[0] == "data" else src[0]
        params.append((bid, tuple(t.shape), tuple(t.stride()), str(t.dtype), t.device.type, data))
    fields = [(f.name, _describe(getattr(graph, f.name))) for f in dataclasses.fields(graph) if f.name != "params"]
    return _digest((env, fields, params))


# ---- the model key ----


class Untraceable(Exception):
    """The model cannot get a model key (the graph key still applies)."""


def _callable_name(f) -> str:
    f = getattr(f, "__func__", f)
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"


def module_fingerprint(model: torch.nn.Module) -> tuple:
    """The module tree, its plain attributes and hooks, and every tensor's metadata and aliasing."""
    modules = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = sorted((k, plain_value(v)) for k, v in vars(m).items() if not k.startswith("_"))
        hooks = [
            [_callable_name(h) for h in getattr(m, d).values()]
            for d in ("_forward_pre_hooks", "_forward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
        ]
        modules.append((name, type(m).__module__, type(m).__qualname__, m.training, attrs, hooks))
    first: dict[int, int] = {}
    tensors = []
    named = [("p", n, t) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [("b", n, t) for n, t in model.named_buffers(remove_duplicate=False)]
    for i, (kind, name, t) in enumerate(named):
        alias = first.setdefault(id(t), i)
        tensors.append((kind, name, tuple(t.shape), t.stride(), t.storage_offset(), str(t.dtype), str(t.device), alias))
        tensors[-1] += (t.requires_grad, t.data_ptr() % 16 == 0)
    import torch.nn.modules.module as mm

    global_hooks = [
        [_callable_name(h) for h in getattr(mm, d, {}).values()]
        for d in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_module_registration_hooks")
    ]
    return (modules, tensors, global_hooks, str(torch.get_default_dtype()), torch.is_grad_enabled())


class _Recorder:
    """The trace record: a running hash of (function, arguments, results) per call."""

    def __init__(self, names: dict[int, str]):
        self.ids = dict(names)
        self.keep: list = []  # keeps recorded tensors alive, so ids are not reused
        self.hash = hashlib.sha256()
        self.calls = 0

    def tensor(self, t: torch.Tensor):
        from torch._subclasses.fake_tensor import FakeTensor

        key = self.ids.get(id(t))
        if key is None:
            if isinstance(t, FakeTensor):
                key = f"t{len(self.ids)}"
            elif t.numel() <= 1 << 16:  # a real tensor made in forward: by value
                key = "real:" + hashlib.sha256(_bytes(t.detach().cpu().contiguous())).hexdigest()
            else:
                raise Untraceable("a large real tensor in forward")
            self.ids[id(t)] = key
            self.keep.append(t)
        return ("T", key, tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.dtype), str(t.device))

    def arg(self, a, depth: int = 0):
        if isinstance(a, torch.Tensor):
            return self.tensor(a)
        if a is None or isinstance(a, (bool, int, float, complex, str)):
            return a
        if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format, enum.Enum)):
            return str(a)
        if a is Ellipsis:
            return "..."
        if depth < 6:
            if isinstance(a, slice):
                return ("slice", self.arg(a.start, depth + 1), self.arg(a.stop, depth + 1), self.arg(a.step, depth + 1))
            if isinstance(a, (list, tuple)):  # torch.Size too
                return (type(a).__name__, [self.arg(x, depth + 1) for x in a])
            if isinstance(a, dict):
                return ("dict", [(repr(k), self.arg(v, depth + 1)) for k, v in a.items()])
        raise Untraceable(f"an argument of type {type(a).__qualname__}")

    def record(self, level: str, func, args, kwargs, out) -> None:
        described = (level, func, self.arg(args), self.arg(kwargs or {}))
        leaves, spec = pytree.tree_flatten(out)
        results = []
        for i, t in enumerate(leaves):
            if isinstance(t, torch.Tensor):
                self.ids[id(t)] = f"{self.calls}.{i}"
                self.keep.append(t)
                results.append(self.tensor(t))
            else:
                results.append(self.arg(t))
        self.hash.update(repr((described, str(spec), results)).encode())
        self.calls += 1


def _function_name(func) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    owner = getattr(func, "__self__", None)  # e.g. the getset descriptor of Tensor.shape.__get__
    if owner is not None and not isinstance(owner, (torch.Tensor, type(torch))):
        name = f"{getattr(owner, '__qualname__', type(owner).__qualname__)}.{name}"
    text = f"{getattr(func, '__module__', None)}.{name}"
    if name is None or " at 0x" in text:
        raise Untraceable(f"an unnamed torch function {func!r}")
    return text


def _trace(model: torch.nn.Module, example_inputs: tuple) -> str:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    try:
        from torch._export.utils import _compiling_state_context as exporting
    except ImportError:  # pragma: no cover (the torch version is part of the key anyway)
        import contextlib

        exporting = contextlib.nullcontext

    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    tensors = _module_tensors(model)
    fakes = {name: fake_mode.from_tensor(t) for name, t in tensors.items()}
    flat, in_spec = pytree.tree_flatten(tuple(example_inputs))
    fake_flat = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in flat]
    names = {id(f): f"param:{n}" for n, f in reversed(list(fakes.items()))}  # tied: the first name
    names.update({id(x): f"input:{i}" for i, x in enumerate(fake_flat) if isinstance(x, torch.Tensor)})
    rec = _Recorder(names)
    for i, x in enumerate(fake_flat):
        if not isinstance(x, torch.Tensor):
            rec.hash.update(repr(("input", i, rec.arg(x))).encode())

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            rec.record("function", _function_name(func), args, kwargs, out)
            return out

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            rec.record("aten", str(func), args, kwargs, out)
            return out

    fake_args = pytree.tree_unflatten(fake_flat, in_spec)
    with warnings.catch_warnings(), exporting(), fake_mode, Ops(), Functions():
        warnings.simplefilter("ignore")  # forward's own warnings come with the capture
        out = torch.func.functional_call(model, fakes, fake_args)
    leaves, out_spec = pytree.tree_flatten(out)
    rec.hash.update(repr(("outputs", str(in_spec), str(out_spec), [rec.arg(x) for x in leaves])).encode())
    return rec.hash.hexdigest()


def model_key(model: torch.nn.Module, example_inputs: tuple, env: tuple) -> str | None:
    """The model key, or None when this model cannot have one (see the module docstring)."""
    saved = [(m, dict(vars(m))) for m in model.modules()]
    try:
        before = module_fingerprint(model)
        trace = _trace(model, example_inputs)
        if module_fingerprint(model) != before:
            raise Untraceable("forward changes module attributes")  # capture names the attribute
    except Exception:  # the trace is only an optimisation: any failure means "capture"
        stats["untraceable"] += 1
        return None
    finally:  # forward ran on fake tensors: what it assigned to module attributes is undone (as export does)
        for m, attributes in saved:
            m.__dict__.clear()
            m.__dict__.update(attributes)
    return _digest((env, before, trace))


# ---- the entry format: data only ----
#
# An entry file is MAGIC, the sha256 (hex) of the rest and "\n", then the rest: one line of JSON,
# "\n", and the raw bytes of every array and bytes value (the JSON gives each one's offset and
# length). Reading is json.loads and np.frombuffer: nothing in the file is executed or imported.
# Every JSON object in an entry is one tagged value (a plain dict is {"dict": pairs}):
#   {"tuple": [...]}  {"dict": [[key, value], ...]}  {"dtype": "float32"}  {"size": [...]}
#   {"array": [dtype, shape, offset, nbytes]}  {"bytes": [offset, nbytes]}  {"np": [dtype, value]}
#   {"enum": [class, name]}  {"record": [class, [[field, value], ...]]} (a dataclass, every field)
#   {"namedtuple": [class, [...]]}  {"type": class} (a pytree node type)  {"spec": [type, context, children]}
# A class is "module:qualname", looked up in modules already imported. Records, enums and named
# tuples must be mkcompiler's own; types must be pytree node types. Records are rebuilt field by
# field without calling __init__ (as unpickling did), named tuples with tuple.__new__.

ARRAY_KINDS = "biuf"  # numpy dtype kinds an entry may hold: no object arrays


@functools.cache
def _class_name(cls) -> str:
    """The name of a class (or of a function that is a pytree node type) as "module:qualname"."""
    name = f"{cls.__module__}:{cls.__qualname__}"
    if _lookup(name) is not cls:  # a local class, or one its module does not export
        raise TypeError(f"{cls!r} cannot be named in a cache entry")
    return name


def _own_name(cls: type) -> str:
    """The name of one of mkcompiler's classes (a reader accepts no other records, enums, named tuples)."""
    if not _is_own(cls.__module__):
        raise TypeError(f"{cls!r} is not mkcompiler's: it cannot be stored in a cache entry")
    return _class_name(cls)


def _is_own(module: str) -> bool:
    return module == "mkcompiler" or module.startswith("mkcompiler.")


def _lookup(name: str):
    module, _, qualname = name.partition(":")
    obj = sys.modules.get(module)  # never imports: only what this process has loaded
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if obj is None:
        raise ValueError(f"no {name} in this process")
    return obj


def _own_class(name: str) -> type:
    cls = _lookup(name) if _is_own(name.partition(":")[0]) else None
    if not isinstance(cls, type):
        raise ValueError(f"{name} is not a class of mkcompiler")
    return cls


def _is_node_type(x) -> bool:
    """A pytree node type (TreeSpec.type: a registered class, or collections.namedtuple) or a
    named tuple class (a namedtuple node's context)."""
    try:
        return x in pytree.SUPPORTED_NODES or (isinstance(x, type) and pytree.is_namedtuple_class(x))
    except TypeError:  # unhashable
        return False


def _node_type(name: str):
    node = _lookup(name)
    if not _is_node_type(node):
        raise ValueError(f"{name} is not a pytree node type")
    return node


class _Encoder:
    """Values -> JSON-able tagged values; arrays and bytes go to `blob`."""

    def __init__(self):
        self.blob = bytearray()

    def raw(self, data: bytes) -> list[int]:
        at = len(self.blob)
        self.blob += data
        return [at, len(data)]

    def value(self, x):
        if x is None or type(x) in (bool, int, float, str):
            return x
        if isinstance(x, enum.Enum):
            return {"enum": [_own_name(type(x)), x.name]}
        if type(x) is list:
            return [self.value(v) for v in x]
        if type(x) is tuple:
            return {"tuple": [self.value(v) for v in x]}
        if type(x) is dict:
            return {"dict": [[self.value(k), self.value(v)] for k, v in x.items()]}
        if type(x) is torch.Size:
            return {"size": list(x)}
        if isinstance(x, torch.dtype):
            return {"dtype": str(x).removeprefix("torch.")}
        if isinstance(x, (bytes, bytearray)):
            return {"bytes": self.raw(bytes(x))}
        if isinstance(x, np.ndarray) and x.dtype.kind in ARRAY_KINDS:
            return {"array": [x.dtype.str, list(x.shape), *self.raw(np.ascontiguousarray(x).tobytes())]}
        if isinstance(x, np.generic) and x.dtype.kind in ARRAY_KINDS:
            return {"np": [x.dtype.str, x.item()]}
        if isinstance(x, pytree.TreeSpec):
            return self.spec(x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return self.record(x)
        if isinstance(x, tuple) and pytree.is_namedtuple_instance(x):
            return {"namedtuple": [_own_name(type(x)), [self.value(v) for v in x]]}
        if _is_node_type(x):
            return {"type": _class_name(x)}
        raise TypeError(f"a {type(x).__qualname__} cannot be stored in a cache entry")

    def record(self, x) -> dict:
        names = [f.name for f in dataclasses.fields(x)]
        if set(getattr(x, "__dict__", {})) - set(names):
            raise TypeError(f"a {type(x).__qualname__} with attributes beside its fields")
        return {"record": [_own_name(type(x)), [[n, self.value(getattr(x, n))] for n in names]]}

    def spec(self, s) -> dict:
        if s.is_leaf():
            return {"spec": None}
        children = [self.spec(c) for c in s.children()]
        return {"spec": [self.value(s.type), self.value(s.context), children]}


def _array(blob: bytes, dtype: str, shape: list, at: int, nbytes: int) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind not in ARRAY_KINDS or dt.itemsize * int(np.prod(shape)) != nbytes or at + nbytes > len(blob):
        raise ValueError("an array that does not fit its entry")
    return np.frombuffer(blob, dt, nbytes // dt.itemsize, at).reshape(shape).copy()  # writable, like the original


def _bytes_at(blob: bytes, at: int, nbytes: int) -> bytes:
    if at + nbytes > len(blob):
        raise ValueError("bytes beyond the entry's end")
    return bytes(blob[at : at + nbytes])


def _record(name: str, pairs: list):
    cls = _own_class(name)
    if not dataclasses.is_dataclass(cls) or [p[0] for p in pairs] != [f.name for f in dataclasses.fields(cls)]:
        raise ValueError(f"the fields of {name} differ")
    obj = object.__new__(cls)
    for field_name, v in pairs:
        object.__setattr__(obj, field_name, v)  # frozen and slotted dataclasses too
    return obj


def _enum(name: str, member: str):
    cls = _own_class(name)
    if not issubclass(cls, enum.Enum):
        raise ValueError(f"{name} is not an enum")
    return cls.__members__[member]


def _namedtuple(name: str, items: list):
    cls = _own_class(name)
    if not pytree.is_namedtuple_class(cls) or len(items) != len(cls._fields):
        raise ValueError(f"{name} is not a named tuple of {len(items)} fields")
    return tuple.__new__(cls, items)


def _spec(parts):
    if parts is None:
        return pytree.treespec_leaf()
    node, context, children = parts
    if not _is_node_type(node) or not all(isinstance(c, pytree.TreeSpec) for c in children):
        raise ValueError("a malformed tree spec")
    return pytree.TreeSpec(node, context, children)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"no dtype torch.{name}")
    return dtype


def _scalar(dtype: str, v):
    dt = np.dtype(dtype)
    if dt.kind not in ARRAY_KINDS:
        raise ValueError(f"a numpy scalar of dtype {dtype}")
    return dt.type(v)


def _decoder(blob: bytes):
    """json.loads' object_hook: each tagged value, its contents already decoded."""
    tags = {
        "tuple": tuple,
        "dict": lambda pairs: {k: v for k, v in pairs},
        "size": torch.Size,
        "dtype": _dtype,
        "bytes": lambda loc: _bytes_at(blob, *loc),
        "array": lambda a: _array(blob, *a),
        "np": lambda a: _scalar(*a),
        "enum": lambda a: _enum(*a),
        "record": lambda a: _record(*a),
        "namedtuple": lambda a: _namedtuple(*a),
        "type": _node_type,
        "spec": _spec,
    }

    def hook(obj: dict):
        if len(obj) != 1 or next(iter(obj)) not in tags:
            raise ValueError(f"an unknown value {sorted(obj)[:3]}")
        tag, v = next(iter(obj.items()))
        return tags[tag](v)

    return hook


def encode(kind: str, key: str, value) -> bytes:
    """An entry file's bytes (see the format above)."""
    enc = _Encoder()
    text = json.dumps([FORMAT, kind, key, enc.value(value)], separators=(",", ":"), allow_nan=True)
    rest = text.encode() + b"\n" + bytes(enc.blob)
    return MAGIC + hashlib.sha256(rest).hexdigest().encode() + b"\n" + rest


def decode(data: bytes, kind: str, key: str):
    """The value of an entry file written by encode(kind, key, value); ValueError if it is not one."""
    head = len(MAGIC) + 65
    if data[: len(MAGIC)] != MAGIC or data[head - 1 : head] != b"\n":
        raise ValueError("not a compile cache entry of this version")
    rest = data[head:]
    if hashlib.sha256(rest).hexdigest().encode() != data[len(MAGIC) : head - 1]:
        raise ValueError("truncated or corrupt (checksum)")
    end = rest.find(b"\n")
    if end < 0:
        raise ValueError("truncated")
    try:
        doc = json.loads(rest[:end], object_hook=_decoder(rest[end + 1 :]))
    except (ValueError, RecursionError, KeyError, TypeError, IndexError, AttributeError) as e:  # not JSON, bad tags
        raise ValueError(f"malformed: {type(e).__name__}: {e}") from None
    if not (isinstance(doc, list) and len(doc) == 4) or doc[:3] != [FORMAT, kind, key]:
        raise ValueError("an entry of another format or for another key")
    return doc[3]


# ---- entries ----


@dataclasses.dataclass
class DagData:
    """The DAG as columns (one list per TileTask field, in field order) and predecessor arrays."""

    columns: list[list]
    pred_count: np.ndarray
    pred: np.ndarray
    counter_sizes: list[int]


@dataclasses.dataclass
class GraphEntry:
    """What a graph key leads to: the compilation without any tensor of the model."""

    checked: bool  # compiled with the passes' invariant checks on (settings.debug >= 1)
    graph: Graph  # with no params: `sources` says where each comes from
    sources: dict[int, tuple]
    dag: DagData
    fields: dict  # the rest of the Compilation (schedule, queue, ...), whatever fields it has


@dataclasses.dataclass
class ModelEntry:
    """What a model key leads to: a graph key."""

    graph_key: str


ENTRY_TYPES = {"graph": GraphEntry, "model": ModelEntry}
_warned: set[tuple[str, str]] = set()  # (directory, problem) warned about in this process


def _warn_once(directory: str, problem: str, message: str) -> None:
    if (directory, problem) not in _warned:
        _warned.add((directory, problem))
        warnings.warn(message, stacklevel=5)


def _unsafe(path: str) -> str | None:
    """Why another user could write in directory `path`, or None."""
    st = os.stat(path)
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return "it belongs to another user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _directory() -> str | None:
    """The entries' directory (created owner-only), or None when another user could write there:
    then the cache is not used (entries are data, but a planted one could still mislead)."""
    root = cache_dir()
    path = os.path.join(root, "compile")
    for d in (root, path):
        os.makedirs(d, mode=0o700, exist_ok=True)  # the root: cache_dir made it
        why = _unsafe(d)
        if why is not None:
            stats["unsafe directory"] += 1
            _warn_once(
                d,
                "unsafe",
                f"mkcompiler: not using the compile cache in {d}: {why}; models compile without it "
                "(chmod 700 the directory, or set MKCOMPILER_CACHE to one only you can write to)",
            )
            return None
    return path


def _path(directory: str, kind: str, key: str) -> str:
    return os.path.join(directory, f"{kind}-{key}.entry")


def _write(kind: str, key: str, obj) -> bool:
    """Store an entry; False when the directory is not used (_directory has warned)."""
    directory = _directory()
    if directory is None:
        return False
    data = encode(kind, key, obj)
    path = _path(directory, kind, key)
    # mkstemp creates the file owner-only (0600); os.replace keeps that, and readers never see half an entry.
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def _read(kind: str, key: str):
    """The stored entry (GraphEntry or ModelEntry), or None when absent, unreadable or not an entry
    of this version: then the model is compiled again (and the entry rewritten)."""
    directory = _directory()
    if directory is None:
        return None
    path = _path(directory, kind, key)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        entry = decode(data, kind, key)
        _check(entry, kind)
        return entry
    except ValueError as e:
        _ignore(path, e)
        return None


def _check(entry, kind: str) -> None:
    """Raise ValueError unless `entry` is a `kind` entry that this source can use."""
    if not isinstance(entry, ENTRY_TYPES[kind]):
        raise ValueError(f"not a {kind} entry")
    if kind == "model" and not isinstance(entry.graph_key, str):
        raise ValueError("a model entry without a graph key")
    if kind == "graph":
        stored = {f.name for f in dataclasses.fields(Compilation)} - set(LIVE_FIELDS)
        ok = isinstance(entry.graph, Graph) and isinstance(entry.dag, DagData) and isinstance(entry.sources, dict)
        if not (ok and isinstance(entry.fields, dict) and set(entry.fields) == stored):
            raise ValueError("a graph entry of another version")


def _ignore(path: str, error: Exception) -> None:
    stats["corrupt"] += 1
    directory = os.path.dirname(path)
    _warn_once(
        directory,
        "unreadable",
        f"mkcompiler: ignoring the compile cache entry {os.path.basename(path)} in {directory} ({error}); "
        "the model is compiled instead",
    )


def _dag_data(dag: TileDAG) -> DagData:
    # The DAG's own arrays (the order networkx's pred lists would give): no networkx graph built.
    return DagData(
        columns=[[getattr(task, f.name) for task in dag.tasks] for f in dataclasses.fields(TileTask)],
        pred_count=np.diff(dag.pred_begin).astype(np.int64),
        pred=np.asarray(dag.pred_index, dtype=np.int64),
        counter_sizes=list(dag.counter_sizes),
    )


def _rebuild_dag(data: DagData) -> TileDAG:
    """The stored DAG with the same tasks and adjacency order as the original (build_dag adds
    each task's edges in turn, so successors are in increasing order). Fields are positional:
    an entry is only read by the source that wrote it (the key holds source_digest)."""
    tasks = [TileTask(*values) for values in zip(*data.columns)]
    succ = np.repeat(np.arange(len(tasks), dtype=np.int64), data.pred_count)
    dag = TileDAG(tasks, zip(data.pred.tolist(), succ.tolist()))
    dag.counter_sizes = data.counter_sizes
    return dag


# Compilation fields not stored: given by the compile that loads the entry, or stored apart.
LIVE_FIELDS = ("graph", "settings", "num_workers", "dag", "timings", "cache")


class CachedCompilation(Compilation):
    """A Compilation read from the cache: its DAG is rebuilt when first used."""

    _dag_data = None
    _dag_value = None

    @property
    def dag(self):
        if self._dag_value is None and self._dag_data is not None:
            self._dag_value = _rebuild_dag(self._dag_data)
            self._dag_data = None
        return self._dag_value

    @dag.setter
    def dag(self, value):
        self._dag_value = value


def store(comp: Compilation, gkey: str, sources: dict[int, tuple], mkey: str | None, checked: bool) -> None:
    """Write the entry for graph key `gkey` and, if given, the model key pointing to it. Failing
    to write (a full disk, a read-only directory, a value the entry format has no type for) only warns."""
    graph = copy.copy(comp.graph)
    graph.params = {}  # never tensors: `sources` says where each comes from
    entry = GraphEntry(
        checked=checked,
        graph=graph,
        sources=sources,
        dag=_dag_data(comp.dag),
        fields={f.name: getattr(comp, f.name) for f in dataclasses.fields(comp) if f.name not in LIVE_FIELDS},
    )
    try:
        if not _write("graph", gkey, entry):
            return
        stats["store"] += 1
    except Exception as e:
        _store_failed(e)
        return
    if mkey is not None:
        link(mkey, gkey, sources)


def link(mkey: str, gkey: str, sources: dict[int, tuple]) -> None:
    """Point model key `mkey` at the entry `gkey`, unless a parameter can only come from a capture."""
    if all(s[0] != "capture" for s in sources.values()):
        try:
            _write("model", mkey, ModelEntry(gkey))
        except Exception as e:
            _store_failed(e)


def _store_failed(e: Exception) -> None:
    stats["store failed"] += 1
    if stats["store failed"] == 1:  # once per process: compiling still works, only slower next time
        warnings.warn(f"mkcompiler: cannot write the compile cache in {cache_dir()}: {e}", stacklevel=4)


def _compilation(
    entry: GraphEntry, gkey: str, params: dict, settings, num_workers: int, status: str
) -> CachedCompilation:
    registry.load_all()  # the op families codegen and the VM look up (capture loads them otherwise)
    graph = entry.graph
    graph.params = params
    comp = CachedCompilation(graph, settings, num_workers, **entry.fields)
    comp._dag_data = entry.dag
    comp.cache = status
    comp.graph_key = gkey
    return comp


def _read_graph(gkey: str, settings) -> GraphEntry | None:
    """The graph entry, if usable (compiled with the checks when settings.debug asks for them)."""
    registry.load_all()  # entries name op families' attribute classes: their modules must be loaded
    entry = _read("graph", gkey)
    if entry is None or (settings.debug >= 1 and not entry.checked):
        return None
    return entry


def load_graph(gkey: str, graph: Graph, settings, num_workers: int) -> CachedCompilation | None:
    """The entry for a freshly captured graph; its parameters are the capture's own tensors."""
    entry = _read_graph(gkey, settings)
    if entry is None:
        return None
    stats["graph hit"] += 1
    return _compilation(entry, gkey, dict(graph.params), settings, num_workers, "graph hit")


def load_model(
    mkey: str, model: torch.nn.Module, settings, num_workers: int, device: torch.device
) -> CachedCompilation | None:
    """The entry for a model key, with parameters bound from the live model (no capture)."""
    pointer = _read("model", mkey)
    if pointer is None:
        return None
    entry = _read_graph(pointer.graph_key, settings)
    if entry is None:
        return None
    tensors = _module_tensors(model)
    buffers = entry.graph.buffers
    params = {}
    for bid, src in entry.sources.items():
        buf = buffers[bid]
        if src[0] == "model":
            t = tensors.get(src[1])
            if t is None or t.dtype != buf.dtype:
                return None
            params[bid] = bound_tensor(src[1], t, buf.kind, stacklevel=4)
        elif src[0] == "data":
            flat = (
                torch.frombuffer(bytearray(src[1]), dtype=torch.uint8) if src[1] else torch.empty(0, dtype=torch.uint8)
            )
            params[bid] = flat.view(buf.dtype).to(device)
        else:
            return None
    stats["hit"] += 1
    return _compilation(entry, pointer.graph_key, params, settings, num_workers, "hit")


source_digest()  # the files as this process loaded them (not as later edited)
