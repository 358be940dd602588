"""The on-disk compile cache: compiled queues reused across processes.

What is stored: the result of the pass pipeline (passes/pipeline.Compilation) without any
tensor of the model: the op graph after the passes (buffers, ops, views, inputs, outputs),
the DAG (compactly; rebuilt when first used), the schedule and the encoded queue. For each
parameter buffer the entry records where its tensor comes from: a module parameter or
buffer by name (re-bound from the live model at every load, so new weight values are used
and KV caches are still updated in place), or, for constants folded at capture (masks,
position tables: values fixed by the code and the shapes), their bytes.

Entries live in MKCOMPILER_CACHE (default ~/.cache/mkcompiler) under compile/, one pickle
per key with a sha256 of its payload in the header: a truncated or corrupt file is ignored
(the model is compiled again and the entry rewritten). Writes go to a temporary file first,
then os.replace, so concurrent compiles never read half an entry. Pickles run code when
loaded: the directory must be writable only by you (as for every pickle-based cache).

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
  effects), or when an argument cannot be recorded by value.
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
import os
import pickle
import sys
import tempfile
import warnings
from collections import Counter

import numpy as np
import torch
import torch.utils._pytree as pytree

from mkcompiler.frontend.capture import bound_tensor
from mkcompiler.ir.dag import TileDAG, TileTask
from mkcompiler.ir.graph import Graph, View
from mkcompiler.ops import registry
from mkcompiler.passes.pipeline import Compilation
from mkcompiler.runtime.megakernel import cache_dir

FORMAT = 2
MAGIC = b"mkcompiler compile cache\n"
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


def _plain(x, depth: int = 0):
    """A stable description of an attribute value: plain values by value, others by type."""
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
        return x
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format, enum.Enum)):
        return str(x)
    if depth < 4:
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, [_plain(v, depth + 1) for v in x])
        if isinstance(x, dict):
            return ("dict", sorted((repr(k), _plain(v, depth + 1)) for k, v in x.items()))
        if isinstance(x, (set, frozenset)):
            return ("set", sorted(repr(_plain(v, depth + 1)) for v in x))
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            fields = [(f.name, _plain(getattr(x, f.name), depth + 1)) for f in dataclasses.fields(x)]
            return (type(x).__qualname__, fields)
    return ("object", type(x).__module__, type(x).__qualname__)


def _callable_name(f) -> str:
    f = getattr(f, "__func__", f)
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"


def module_fingerprint(model: torch.nn.Module) -> tuple:
    """The module tree, its plain attributes and hooks, and every tensor's metadata and aliasing."""
    modules = []
    for name, m in model.named_modules(remove_duplicate=False):
        attrs = sorted((k, _plain(v)) for k, v in vars(m).items() if not k.startswith("_"))
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
    try:
        before = module_fingerprint(model)
        trace = _trace(model, example_inputs)
        if module_fingerprint(model) != before:
            raise Untraceable("forward changes module attributes")
    except Exception:  # the trace is only an optimisation: any failure means "capture"
        stats["untraceable"] += 1
        return None
    return _digest((env, before, trace))


# ---- entries ----


def _path(kind: str, key: str) -> str:
    root = os.path.join(cache_dir(), "compile")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, f"{kind}-{key}.pkl")


def _write(kind: str, key: str, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    path = _path(kind, key)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(kind: str, key: str):
    """The stored object, or None when absent, unreadable or corrupt (then it is recompiled)."""
    try:
        path = _path(kind, key)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            data = f.read()
        head = len(MAGIC) + 65
        if (
            data[: len(MAGIC)] != MAGIC
            or hashlib.sha256(data[head:]).hexdigest().encode() + b"\n" != data[len(MAGIC) : head]
        ):
            raise ValueError("bad header or checksum")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree specs, unpickled
            obj = pickle.loads(data[head:])
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("key") != key:
            raise ValueError("not an entry for this key")
        return obj
    except Exception:
        stats["corrupt"] += 1
        return None


def _dag_data(dag: TileDAG) -> dict:
    """The DAG as columns (one list per TileTask field, in field order) and predecessor arrays."""
    preds = [list(dag.graph.pred[t]) for t in range(len(dag))]
    return {
        "columns": [[getattr(task, f.name) for task in dag.tasks] for f in dataclasses.fields(TileTask)],
        "pred_count": np.array([len(p) for p in preds], dtype=np.int64),
        "pred": np.fromiter((u for p in preds for u in p), dtype=np.int64),
        "counter_sizes": list(dag.counter_sizes),
    }


def _rebuild_dag(data: dict) -> TileDAG:
    """The stored DAG with the same tasks and adjacency order as the original (build_dag adds
    each task's edges in turn, so successors are in increasing order). Fields are positional:
    an entry is only read by the source that wrote it (the key holds source_digest)."""
    tasks = [TileTask(*values) for values in zip(*data["columns"])]
    succ = np.repeat(np.arange(len(tasks), dtype=np.int64), data["pred_count"])
    dag = TileDAG(tasks, zip(data["pred"].tolist(), succ.tolist()))
    dag.counter_sizes = data["counter_sizes"]
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
    to write (a full disk, a read-only directory, an output type pickle refuses) only warns."""
    graph = copy.copy(comp.graph)
    graph.params = {}  # never tensors: `sources` says where each comes from
    entry = {
        "format": FORMAT,
        "key": gkey,
        "checked": checked,  # compiled with the passes' invariant checks on (settings.debug >= 1)
        "graph": graph,
        "sources": sources,
        "dag": _dag_data(comp.dag),
        # the rest of the Compilation (schedule, queue, ...), whatever fields it has
        "fields": {f.name: getattr(comp, f.name) for f in dataclasses.fields(comp) if f.name not in LIVE_FIELDS},
    }
    try:
        _write("graph", gkey, entry)
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
            _write("model", mkey, {"format": FORMAT, "key": mkey, "graph_key": gkey})
        except Exception as e:
            _store_failed(e)


def _store_failed(e: Exception) -> None:
    stats["store failed"] += 1
    if stats["store failed"] == 1:  # once per process: compiling still works, only slower next time
        warnings.warn(f"mkcompiler: cannot write the compile cache in {cache_dir()}: {e}", stacklevel=4)


def _compilation(entry: dict, params: dict, settings, num_workers: int, status: str) -> CachedCompilation:
    registry.load_all()  # the op families codegen and the VM look up (capture loads them otherwise)
    graph = entry["graph"]
    graph.params = params
    comp = CachedCompilation(graph, settings, num_workers, **entry["fields"])
    comp._dag_data = entry["dag"]
    comp.cache = status
    comp.graph_key = entry["key"]
    return comp


def _usable(entry, settings) -> bool:
    return entry is not None and (settings.debug < 1 or entry["checked"])


def load_graph(gkey: str, graph: Graph, settings, num_workers: int) -> CachedCompilation | None:
    """The entry for a freshly captured graph; its parameters are the capture's own tensors."""
    entry = _read("graph", gkey)
    if not _usable(entry, settings):
        return None
    stats["graph hit"] += 1
    return _compilation(entry, dict(graph.params), settings, num_workers, "graph hit")


def load_model(
    mkey: str, model: torch.nn.Module, settings, num_workers: int, device: torch.device
) -> CachedCompilation | None:
    """The entry for a model key, with parameters bound from the live model (no capture)."""
    pointer = _read("model", mkey)
    if pointer is None:
        return None
    entry = _read("graph", pointer["graph_key"])
    if not _usable(entry, settings):
        return None
    tensors = _module_tensors(model)
    buffers = entry["graph"].buffers
    params = {}
    for bid, src in entry["sources"].items():
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
    return _compilation(entry, params, settings, num_workers, "hit")


source_digest()  # the files as this process loaded them (not as later edited)
