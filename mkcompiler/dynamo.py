"""`torch.compile(model, backend="mkcompiler")`: every graph dynamo hands over runs as megakernels.

    compiled = torch.compile(model, backend="mkcompiler", options={"num_workers": 8})

Graph breaks are dynamo's: each graph it captures comes here and is compiled with
`mkcompiler.compile`; `options` are that function's options (the fields of `mkcompiler.Settings`).
This backend defaults to fallback="eager": an op mkcompiler cannot compile runs in eager PyTorch
between megakernel segments of the same graph (a FallbackWarning names it) instead of failing;
pass options={"fallback": "error"} to refuse such graphs. Inference only: outputs carry no
autograd history.

Dynamo passes a graph's parameters, buffers and other tensors as graph inputs. Here each input is
- bound: a module parameter or buffer (dynamo marks them static inputs), or a tensor the graph
  writes in place (a KV cache reached through an argument, as Hugging Face's StaticCache is).
  Bound tensors become buffers of a module around the graph (`_GraphModel`), so capture reads
  them in place and updates the written ones in place (model state): no copy, per call or ever;
- an input: any other tensor, given to the megakernel at each call. One on another device, or
  strided, is given as a contiguous copy on the graph's device; where the graph writes a tensor
  computed from it, the graph reads a clone of it (see `_private_inputs`);
- a value: an int or float (the size of a dynamic dimension), a constant of the compile.
Graphs are compiled when first called, for the call's shapes and values, and again for each new
combination: dynamo's guards bring a new shape to a new graph, or its automatic dynamic shapes
bring it to a graph with symbolic sizes, which is specialized here. A graph compiles for at most
`torch._dynamo.config.recompile_limit` combinations (as dynamo caps its own recompiles); past
that, a RecompileLimitWarning says so and new ones run the graph eagerly. Bound tensors are
checked by address at every call: moved ones (a new KV cache for each `generate()`, another
instance of the model) are bound again by compiling once more, which the compile cache
(mkcompiler/tools/cache.py) serves without capture or passes, as it serves a later process.

Registration: the package's entry point (pyproject's `torch_dynamo_backends` group, read by
dynamo's registry) names `backend`, so `backend="mkcompiler"` works in a process that never
imported mkcompiler; `import mkcompiler` registers it as well (for a source checkout), through
`register()`, without importing torch._dynamo (slow) before it is needed.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import operator
import sys
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from mkcompiler.api import compile as mk_compile
from mkcompiler.ir.settings import Settings

NAME = "mkcompiler"
_REGISTRY = "torch._dynamo.backends.registry"
DEFAULT_OPTIONS = {"fallback": "eager"}


class RecompileLimitWarning(UserWarning):
    """A graph met more shapes than torch._dynamo.config.recompile_limit: new ones run eagerly."""


class Role(enum.Enum):
    BOUND = "bound"  # a module tensor or one written in place: read (and written) in place
    INPUT = "input"  # a tensor given at each call
    VALUE = "value"  # a Python number: a constant of the compile


def backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, mode: str | None = None):
    """The dynamo backend: `gm` as a callable that runs it as megakernels (a CompiledGraph).

    `options`: keyword options of `mkcompiler.compile` (default fallback="eager": ops mkcompiler
    cannot compile run eagerly inside the graph). `mode` has no meaning here and is ignored."""
    options = {**DEFAULT_OPTIONS, **(options or {})}
    Settings().replace(**options)  # unknown options fail here, not at the first call
    if mode not in (None, "default"):
        warnings.warn(f"mkcompiler: torch.compile mode={mode!r} is ignored (a megakernel is one launch)", stacklevel=2)
    compiled = CompiledGraph(gm, example_inputs, options)
    _LIVE[:] = [r for r in _LIVE if r() is not None] + [weakref.ref(compiled)]
    return compiled


def compiled_graphs() -> list[CompiledGraph]:
    """The CompiledGraphs of this process that dynamo still holds, oldest first (to inspect
    their megakernels: `compiled_graphs()[-1].compiled`)."""
    return [g for g in (r() for r in _LIVE) if g is not None]


_LIVE: list[weakref.ref] = []


def _roles(gm: fx.GraphModule, example_inputs: list) -> list[Role]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"the graph has {len(placeholders)} inputs, dynamo gave {len(example_inputs)}")
    written = _written_placeholders(gm)
    return [_role(n, x, n in written) for n, x in zip(placeholders, example_inputs)]


def _role(node: fx.Node, example, written: bool) -> Role:
    if not isinstance(example, torch.Tensor):
        return Role.VALUE
    # Dynamo marks module parameters and buffers (and tensors given to mark_static_address) static.
    static = isinstance(example, nn.Parameter) or getattr(example, "_dynamo_static_input_type", None) is not None
    # Dynamo traced the graph on fake tensors: an in-place write bumped the placeholder's version
    # (views share their base's counter). `written` is the same fact read off the graph's ops.
    traced = node.meta.get("example_value")
    bumped = isinstance(traced, torch.Tensor) and not traced.is_inference() and traced._version > 0
    return Role.BOUND if static or written or bumped else Role.INPUT


# ---- what the graph writes ----

# Python's augmented assignments: dynamo records `x += y` on a tensor as operator.iadd(x, y).
_AUGMENTED = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
}  # fmt: skip
_NOT_DATA = {"requires_grad_", "share_memory_"}  # in-place by name, but they write no values


def _written_args(node: fx.Node) -> list[fx.Node]:
    """The tensors `node` writes in place: `x.add_(y)`, `x[i] = v`, `x += y`, `op(..., out=x)`,
    `f(x, inplace=True)`, an aten op whose schema marks an argument written."""
    if node.op not in ("call_method", "call_function", "call_module"):
        return []
    target, args = node.target, node.args
    written = [a for a in pytree.tree_leaves(node.kwargs.get("out")) if isinstance(a, fx.Node)]
    if node.kwargs.get("inplace") is True and args:
        written.append(args[0])
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema.arguments
        for i, a in enumerate(args):
            if i < len(schema) and schema[i].alias_info is not None and schema[i].alias_info.is_write:
                written.append(a)
    elif target in _AUGMENTED or target is operator.setitem or target == "__setitem__":
        written.append(args[0])
    elif _in_place_name(target if node.op == "call_method" else getattr(target, "__name__", "")) and args:
        written.append(args[0])  # x.add_(y), torch.relu_(x), torch.Tensor.add_(x, y), F.relu_(x)
    return [a for a in written if isinstance(a, fx.Node)]


def _in_place_name(name) -> bool:
    """PyTorch's convention: a trailing underscore names the in-place variant."""
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_") and name not in _NOT_DATA


def _storage(node: fx.Node) -> StorageWeakRef | None:
    """The storage of the fake tensor dynamo traced for `node` (views share their base's)."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.is_sparse:
        return None
    return StorageWeakRef(value.untyped_storage())


def _written_placeholders(gm: fx.GraphModule) -> set[fx.Node]:
    """Placeholders whose memory the graph writes: an in-place op writes the placeholder or a
    view of it (the written tensor shares its storage, in dynamo's trace), however many view,
    slicing or alias ops lie between. Where dynamo recorded no fake value, every placeholder the
    written tensor is computed from counts as written: bound, read in place, is never wrong, only
    rebound when its address changes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_storage: dict = {}
    for p in placeholders:
        if (s := _storage(p)) is not None:
            by_storage.setdefault(s, []).append(p)
    written: set[fx.Node] = set()
    for node in gm.graph.nodes:
        for a in _written_args(node):
            s = _storage(a)
            if s is not None:
                written.update(by_storage.get(s, ()))
            else:
                written.update(p for p in _sources(a) if p.op == "placeholder")
    return written


def _sources(node: fx.Node) -> set[fx.Node]:
    """`node` and every node it is computed from."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _private_inputs(gm: fx.GraphModule, roles: list[Role], device) -> set[int]:
    """Inputs the graph must read as a clone: those given as a copy (`CompiledGraph._inputs_of`:
    from another device, or strided) that a tensor the graph writes is computed from.

    Why: an op that copied the input in dynamo's trace (`x.to("cuda")` of a CPU tensor,
    `x.contiguous()` of a strided one; Hugging Face's StaticLayer moves its CPU `cumulative_length`
    to the GPU and adds to the result in place) returns the copy we give it itself, so the export
    sees the graph write one of its inputs (USER_INPUT_MUTATION), which dynamo's graph never does.
    A clone restores dynamo's semantics: the write lands in a temporary of the megakernel."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    feeding = set().union(*(_sources(a) for n in gm.graph.nodes for a in _written_args(n)))
    private = set()
    for i, (p, role) in enumerate(zip(placeholders, roles)):
        traced = p.meta.get("example_value")
        if role is not Role.INPUT or p not in feeding or not isinstance(traced, torch.Tensor):
            continue
        if (device is not None and traced.device != device) or not traced.is_contiguous():
            private.add(i)
    return private


@dataclass(frozen=True)
class _Slot:
    """How one graph input reaches the graph inside _GraphModel."""

    role: Role
    name: str  # the buffer (BOUND)
    value: object = None  # the constant (VALUE)
    clone: bool = False  # an INPUT the graph reads as a clone (`_private_inputs`)


class _GraphModel(nn.Module):
    """The graph as a module whose forward takes only the input tensors: bound tensors are its
    buffers (the tensors themselves, detached: same storage, so capture reads them in place and
    writes model state in place), values are constants of this compile."""

    def __init__(self, gm: fx.GraphModule, roles: list[Role], args: list, private: frozenset = frozenset()):
        super().__init__()
        self.graph_module = gm
        self._slots = []
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        for i, (role, a, name) in enumerate(zip(roles, args, placeholders)):
            if hasattr(self, name):  # the placeholder's name (errors name it) unless nn.Module has it
                name = f"bound_{i}"
            if role is Role.BOUND:
                self.register_buffer(name, a.detach(), persistent=False)
            self._slots.append(_Slot(role, name, a if role is Role.VALUE else None, i in private))

    def forward(self, *inputs):
        given = iter(inputs)
        args = []
        for slot in self._slots:
            if slot.role is Role.BOUND:
                args.append(getattr(self, slot.name))
            elif slot.role is Role.INPUT:
                x = next(given)
                args.append(x.clone() if slot.clone else x)  # an op of the graph: the megakernel copies x
            else:
                args.append(slot.value)
        # Run node by node with each node's meta current, so that capture's nodes keep the stack
        # traces dynamo recorded (error messages and fallback warnings name the user's line).
        with fx.traceback.preserve_node_meta():
            return fx.Interpreter(self.graph_module).run(*args)


class CompiledGraph:
    """One dynamo graph, compiled (`mkcompiler.compile`) for each combination of input shapes and
    values it meets, up to the recompile limit. `compiled` maps each such key to its Megakernel
    (or SegmentedModel, with fallback="eager" and ops that run eagerly). Bound tensors that move
    (a new KV cache for each `generate()`) are bound again: the same key, compiled again through
    the compile cache (a hit: no capture, no passes), and the compile for the old tensors is
    dropped (it would keep them alive)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, options: dict):
        self.graph_module = gm
        self.options = options
        self.roles = _roles(gm, example_inputs)
        self._bound = [i for i, r in enumerate(self.roles) if r is Role.BOUND]
        self._inputs = [i for i, r in enumerate(self.roles) if r is Role.INPUT]
        self._values = [i for i, r in enumerate(self.roles) if r is Role.VALUE]
        # A decode step passes ~200 bound tensors: the per-call work picks them out of the
        # arguments and reads their addresses in C loops (itemgetter, map), not Python ones.
        self._take_bound, self._take_inputs, self._take_values = map(_picker, (self._bound, self._inputs, self._values))
        self.compiled: dict[tuple, object] = {}
        self._addresses: dict[tuple, tuple] = {}  # key -> the bound tensors' addresses it was compiled for
        # The device the graph runs on: its bound tensors' (the model's weights). Graph inputs dynamo
        # hands over on another device (a CPU tensor transformers makes for a GPU model) are copied
        # there at each call, as an eager op mixing devices would read them.
        bound = [example_inputs[i] for i in self._bound]
        self.device = bound[0].device if bound else None
        self._private = frozenset(_private_inputs(gm, self.roles, self.device))
        self._warned = False
        # The key and megakernel inputs of the last call that ran compiled: `compiled[key](*inputs)`
        # repeats its megakernel call alone (examples/hf_generate.py times it beside the whole step;
        # `compiled[key].profile(*inputs)` profiles it). Holds the last inputs until the next call.
        self.last_call: tuple[tuple, tuple] | None = None

    def __call__(self, *args):
        inputs = self._take_inputs(args)
        # Dynamo guards every tensor's dtype, sizes and strides, or passes the symbols of its
        # dynamic sizes as values: input shapes and values determine the layouts of the rest.
        key = (tuple(map(_SHAPE, inputs)), self._take_values(args))
        if not self._bound_in_place(key, args) and not self._compile(key, args):
            return self.graph_module(*args)  # past the recompile limit
        inputs = self._inputs_of(inputs)
        self.last_call = (key, inputs)
        return self.compiled[key](*inputs)

    def _addresses_of(self, args) -> tuple:
        return tuple(map(_DATA_PTR, self._take_bound(args)))

    def _bound_in_place(self, key: tuple, args) -> bool:
        """Whether `key` is compiled for the bound tensors where this call's are: each at the
        address it was bound at (a new KV cache, or a parameter whose `.data` was replaced, is
        not; the tensor objects may be the same while their memory moved, so addresses decide)."""
        addresses = self._addresses.get(key)
        return addresses is not None and self._addresses_of(args) == addresses

    def _inputs_of(self, inputs: tuple) -> tuple:
        """The megakernel's inputs: contiguous (dynamo may pass views, e.g. the last row of a batch),
        on the graph's device. The usual call passes them as they are (no copy, no new tuple)."""
        device = self.device
        if all(x.is_contiguous() and (device is None or x.device == device) for x in inputs):
            return inputs
        inputs = [x.contiguous() for x in inputs]
        return tuple(x if device is None or x.device == device else x.to(device) for x in inputs)

    def _compile(self, key: tuple, args) -> bool:
        """Compile for this call's key and bound tensors; False when the key is new and the
        recompile limit is reached."""
        from torch._dynamo import config  # imported: dynamo is calling us

        limit = config.recompile_limit
        if key not in self.compiled and len(self.compiled) >= limit:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"mkcompiler: a graph was compiled for {limit} combinations of input shapes "
                    "(torch._dynamo.config.recompile_limit); new ones run eagerly. Raise the limit, or give the "
                    "model inputs of fewer shapes (a static KV cache, padded prompts)",
                    RecompileLimitWarning,
                    stacklevel=3,
                )
            return False
        self.compiled.pop(key, None)  # the old tensors are not kept alive while compiling for the new ones
        self._addresses.pop(key, None)
        model = _GraphModel(self.graph_module, self.roles, list(args), self._private)
        inputs = self._inputs_of(self._take_inputs(args))
        with torch.no_grad():
            self.compiled[key] = mk_compile(model, inputs, **self.options)
        self._addresses[key] = self._addresses_of(args)
        return True

    def __repr__(self):
        counts = {r: self.roles.count(r) for r in Role}
        return (
            f"<CompiledGraph {counts[Role.INPUT]} inputs, {counts[Role.BOUND]} bound tensors, "
            f"{counts[Role.VALUE]} values; compiled for {len(self.compiled)} shape(s)>"
        )


_SHAPE = operator.attrgetter("shape")
_DATA_PTR = torch.Tensor.data_ptr


def _picker(indices: list[int]):
    """`args -> tuple(args[i] for i in indices)`, as one C call (itemgetter) for any count
    (itemgetter alone returns a bare item for one index and refuses none)."""
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    if indices:
        (i,) = indices
        return lambda args: (args[i],)
    return lambda args: ()


# ---- registration ----


def register() -> None:
    """Make backend="mkcompiler" known to dynamo: now if its registry is imported, else when it is."""
    if _REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _register() -> None:
    from torch._dynamo.backends import registry

    # Where the entry point is known, the registry loads it itself (registering here too would
    # make it refuse the entry point as a duplicate name).
    if NAME not in registry._COMPILER_FNS and registry._BACKENDS.get(NAME) is None:
        registry.register_backend(backend, name=NAME)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds dynamo's registry module as the import system would, and registers the backend
    once the module has run; then leaves sys.meta_path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)
