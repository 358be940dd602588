"""fallback="eager": megakernels for what mkcompiler can compile, eager PyTorch for the rest.

The model is exported once, as capture does, and its unlifted graph (parameters as get_attr,
state writes as in-place `copy_`, so graph order is eager order) is probed node by node with
capture's own lowerings into a throwaway op graph. A node is then
- megakernel: it lowers and emits tile ops;
- eager: it is refused (the warning names it, its source line and why);
- free: it lowers to views only (or is an assert). Free nodes are copied into every segment
  that reads them, so no segment exists only to make a view and no view crosses a boundary
  (a megakernel would copy it out);
- state: a write into a module buffer (a KV cache); it joins whichever segment its inputs end in.
Nodes are levelled: megakernel segments on even levels, eager ones on odd levels, and each node
goes to the first level at or after its inputs' (and, for module state, after earlier
readers/writers of the same buffer) whose kind is its own: the fewest alternations that order
allows. Segments are fx GraphModules over the model's own parameter and buffer tensors;
megakernel segments are compiled with `mkcompiler.compile`, eager ones run as they are.
"""

from __future__ import annotations

import operator
import threading
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from mkcompiler.errors import UnsupportedOpError, check_input, flatten_call
from mkcompiler.frontend import capture as cap
from mkcompiler.ir.graph import BufferKind, Graph
from mkcompiler.ops import registry

MEGAKERNEL, EAGER = "megakernel", "eager"
STATE, ATTACHED = "state", "attached"  # levelled with their inputs / with the node they take an item of
aten = torch.ops.aten


class FallbackWarning(UserWarning):
    """Part of a compiled model runs in eager PyTorch, outside the megakernels."""


class _Refusal(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


class _ProbeContext(cap.LoweringContext):
    """Lowers into a throwaway graph; a refusal raises _Refusal carrying only what was refused
    (capture's message appends the whole supported set, too long to repeat per op)."""

    def unsupported(self, node, what: str):
        raise _Refusal(what)


# ---- export ----


def _export(model: torch.nn.Module, example_inputs: tuple) -> fx.GraphModule:
    registry.load_all()
    with warnings.catch_warnings():  # torch.export's own deprecation chatter
        warnings.simplefilter("ignore", FutureWarning)
        ep = torch.export.export(model, tuple(example_inputs), strict=False)
        gm = ep.run_decompositions(cap._decompositions()).module()
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":  # input checks: SegmentedModel checks its inputs
            gm.graph.erase_node(n)
    _hoist_constants(gm)
    _relax_views(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# aten.view and _unsafe_view fail on strides they cannot express; aten.reshape copies instead.
_VIEWS = (aten.view.default, aten._unsafe_view.default)


def _relax_views(gm: fx.GraphModule) -> None:
    """Turn the graph's views into reshapes wherever nothing writes through them.

    Export decomposed each `reshape` into a `view` where the traced (fake) strides allowed one.
    Segments run on other strides: a megakernel segment is exported again on contiguous inputs
    (and receives contiguous ones), an eager op's real kernel may lay out its result otherwise
    than its fake did (CUDA attention). A view valid on the traced strides then raises. Reshape
    is the same view where one exists and a copy only where view would raise, so values never
    change; what a copy loses is aliasing, which matters only to a write through the view (or
    through a view of it) meant to reach its base. The exported graph is functional but for its
    in-place state writes (`copy_` into a buffer or an input), so a view none of whose aliases
    is written in place is safe to relax; the others stay views."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _VIEWS and not _written_through(n):
            n.target = aten.reshape.default


def _written_through(node: fx.Node) -> bool:
    """Does an op write in place into `node` or into a tensor that aliases it (a view of it, a view of that, ...)?"""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if _writes(u, n):
                return True
            if _aliases(u, n):
                todo.append(u)
    return False


def _schema(n: fx.Node):
    return n.target._schema if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) else None


def _writes(user: fx.Node, n: fx.Node) -> bool:
    """Does `user` write into its argument `n` in place (per its schema; an unknown callable might)?"""
    schema = _schema(user)
    if schema is None:  # a callable of unknown effect (a higher-order op, a submodule) may write
        return user.op != "output" and user.target is not operator.getitem
    given = _arguments(user)
    return any(a.alias_info is not None and a.alias_info.is_write and given.get(a.name) is n for a in schema.arguments)


def _aliases(user: fx.Node, n: fx.Node) -> bool:
    """May `user`'s result share memory with its argument `n` (a view op; an item of one's outputs)?"""
    if user.target is operator.getitem or user.op != "call_function":
        return True
    schema = _schema(user)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


def _random(n: fx.Node) -> bool:
    """Does the op draw random numbers at this call? ATen tags every op that may (dropout, and
    attention for its dropout_p) nondeterministic_seeded; one whose dropout probability is 0, or
    that is not in training, draws none (attention in inference: it compiles)."""
    if not isinstance(n.target, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded not in n.target.tags:
        return False
    given = _arguments(n)
    return not (given.get("dropout_p", given.get("p")) == 0 or given.get("train") is False)


def _arguments(n: fx.Node) -> dict:
    """An aten node's arguments by schema name, defaults included."""
    arguments = n.target._schema.arguments
    given = {a.name: a.default_value for a in arguments if a.has_default_value()}
    given.update(zip((a.name for a in arguments), n.args))
    given.update(n.kwargs)
    return given


def _hoist_constants(gm: fx.GraphModule) -> None:
    """Nodes that depend on no input, parameter or state (the ones capture folds) become constant
    buffers, so both kinds of segment just read them and none is computed twice."""
    values = {n.name: None for n in gm.graph.nodes}
    consts = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and not _random(n):  # a random op draws new numbers each call
            folded = cap._fold(n, values)
            if folded is not None:
                values[n.name] = folded
                consts.append(n)
    for i, n in enumerate(consts):
        if all(values[u.name] is not None for u in n.users):
            continue  # only other constants read it
        name = f"_mk_constant{i}"
        gm.register_buffer(name, values[n.name].value)
        with gm.graph.inserting_before(n):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(n.meta)
        n.replace_all_uses_with(attr)


# ---- probe: which nodes a megakernel can run ----


def _is_write(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target is aten.copy_.default


def _stub(graph: Graph, name: str, val):
    """A fresh contiguous tensor standing for a value computed eagerly (or given by the caller)."""
    if isinstance(val, torch.Tensor):
        return graph.new_tensor(name, tuple(val.shape), val.dtype)
    if isinstance(val, (list, tuple)):
        return tuple(_stub(graph, name, v) for v in val)
    return val


def _bind_attr(graph: Graph, gm: fx.GraphModule, n: fx.Node, state: bool):
    t = _attr(gm, n.target)
    if not isinstance(t, torch.Tensor):
        return None  # a submodule (a higher-order op's body): its user runs eagerly
    try:
        return cap._bind_param(graph, n.target, t, BufferKind.STATE if state else BufferKind.PARAM)
    except UnsupportedOpError:  # state a megakernel cannot update in place: its writer is refused later
        return _stub(graph, n.name, t)


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _refused_in_use(n: fx.Node, value) -> str | None:
    """A lowering may return a Refused stand-in for an output it cannot make (layer_norm's mean):
    fine unless something reads it."""
    if isinstance(value, cap.Refused):
        return value.what if n.users else None
    if isinstance(value, tuple):
        for u in n.users:
            if u.target is operator.getitem and isinstance(value[u.args[1]], cap.Refused) and u.users:
                return value[u.args[1]].what
    return None


def _probe_node(ctx: _ProbeContext, n: fx.Node, env: dict, kinds: dict) -> tuple[str | None, object, str]:
    """(kind, value, reason) of one node; kind None for a free node."""
    val = n.meta.get("val")
    if n.op == "call_module":
        return EAGER, _stub(ctx.graph, n.name, val), f"a call of submodule {n.target}"
    if n.target in cap.IGNORED:
        return None, None, ""
    if n.target is operator.getitem:
        src, i = n.args
        return (ATTACHED if src in kinds else None), env[src.name][i], ""
    if _is_write(n):
        if n.args[0].op == "get_attr":
            return STATE, None, ""
        return EAGER, None, f"an in-place write into {n.args[0].name}"
    if _random(n):
        return EAGER, _stub(ctx.graph, n.name, val), "a random op (eager draws new numbers at each call)"
    before = len(ctx.graph.ops)
    try:
        value = cap._lower_node(ctx, n, env)
    except _Refusal as e:
        return EAGER, _stub(ctx.graph, n.name, val), e.what
    except UnsupportedOpError as e:
        return EAGER, _stub(ctx.graph, n.name, val), str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001  a lowering that trips on these arguments: eager still runs it
        return EAGER, _stub(ctx.graph, n.name, val), f"its lowering failed: {type(e).__name__}: {e}"
    refused = _refused_in_use(n, value)
    if refused:
        return EAGER, _stub(ctx.graph, n.name, val), refused
    return (MEGAKERNEL if len(ctx.graph.ops) > before else None), value, ""


def _probe(gm: fx.GraphModule) -> tuple[dict, dict]:
    """kinds: node -> MEGAKERNEL | EAGER | STATE | ATTACHED for every node that is not free;
    reasons: eager node -> what mkcompiler refused."""
    graph = Graph()
    ctx = _ProbeContext(graph)
    ctx.order = {n: i for i, n in enumerate(gm.graph.nodes)}
    state = {n.args[0] for n in gm.graph.nodes if _is_write(n)}
    env, kinds, reasons = {}, {}, {}
    with warnings.catch_warnings():  # capture's own warnings come again when a segment compiles
        warnings.simplefilter("ignore")
        for n in gm.graph.nodes:
            ctx.fx_node = n
            if n.op == "placeholder":
                env[n.name] = _stub(graph, n.name, n.meta.get("val"))
            elif n.op == "get_attr":
                env[n.name] = _bind_attr(graph, gm, n, n in state)
            elif n.op in ("call_function", "call_module"):
                kind, env[n.name], reason = _probe_node(ctx, n, env, kinds)
                if kind is not None:
                    kinds[n] = kind
                if kind == EAGER:
                    reasons[n] = reason
    return kinds, reasons


# ---- segments ----


@dataclass
class _Segment:
    kind: str
    real: list[fx.Node]  # nodes levelled into this segment
    nodes: list[fx.Node] = field(default_factory=list)  # real and free nodes, in graph order
    inputs: list[fx.Node] = field(default_factory=list)  # placeholders and earlier segments' nodes
    outputs: list[fx.Node] = field(default_factory=list)  # what later segments or the model's output read
    tail: list[fx.Node] = field(default_factory=list)  # views and parameters the model returns (last segment)
    runner: object = None  # the compiled Megakernel or the eager GraphModule


class _Closure:
    """What a node's inputs come from, looking through free nodes: (real nodes, free nodes,
    get_attr and placeholder roots)."""

    def __init__(self, kinds: dict):
        self.kinds = kinds
        self.memo: dict = {}

    def __call__(self, node: fx.Node) -> tuple[set, set, set]:
        real, free, roots = set(), set(), set()
        for a in node.all_input_nodes:
            if a in self.kinds:
                real.add(a)
            elif a.op in ("get_attr", "placeholder"):
                roots.add(a)
            else:
                if a not in self.memo:
                    self.memo[a] = self(a)
                r, f, o = self.memo[a]
                real |= r
                free |= f | {a}
                roots |= o
        return real, free, roots


def _levels(gm: fx.GraphModule, kinds: dict, closure: _Closure) -> dict:
    """node -> level (even: megakernel, odd: eager). Nodes that touch the same module buffer or
    input keep their graph order across segments when one of them writes it."""
    level: dict = {}
    last_write: dict = {}
    reads_since: dict = defaultdict(set)
    for n in gm.graph.nodes:
        if n not in kinds:
            continue
        real, _, roots = closure(n)
        deps = set(real)
        written = n.args[0] if _is_write(n) else None
        for r in roots:
            if r in last_write:
                deps.add(last_write[r])
            if r is written:
                deps |= reads_since[r]
        kind = kinds[n]
        lo = max((level[d] for d in deps if d is not n), default=0)
        if kind == ATTACHED:
            level[n] = level[n.args[0]]
        elif kind == STATE:
            level[n] = lo
        else:
            level[n] = lo + (lo % 2 != (kind == EAGER))
        for r in roots:
            if r is written:
                last_write[r], reads_since[r] = n, set()
            else:
                reads_since[r].add(n)
    return level


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _plan(gm: fx.GraphModule, kinds: dict) -> list[_Segment]:
    closure = _Closure(kinds)
    level = _levels(gm, kinds, closure)
    by_level = defaultdict(list)
    for n in gm.graph.nodes:
        if n in level:
            by_level[level[n]].append(n)
    segments: list[_Segment] = []
    for lv in sorted(by_level):
        real = by_level[lv]
        # Only a node that emits tile ops earns a megakernel; state writes alone run eagerly.
        kind = MEGAKERNEL if any(kinds[n] == MEGAKERNEL for n in real) else EAGER
        if segments and segments[-1].kind == kind:  # adjacent levels keep their order merged
            segments[-1].real += real
        else:
            segments.append(_Segment(kind, real))
    out = _output_node(gm.graph)
    tail = [a for a in out.all_input_nodes if a not in kinds and a.op != "placeholder"]
    if tail:  # the model returns views (or parameters): the last segment, made eager, makes them
        if not segments or segments[-1].kind != EAGER:
            segments.append(_Segment(EAGER, []))
        segments[-1].tail = tail
    _fill(segments, closure, out)
    return segments


def _fill(segments: list[_Segment], closure: _Closure, out: fx.Node) -> None:
    """Each segment's nodes (its real nodes and the free nodes they read), inputs and outputs."""
    position = {n: i for i, n in enumerate(out.graph.nodes)}
    for seg in segments:
        members = set(seg.real)
        for n in seg.real + seg.tail:
            members |= closure(n)[1]
        members |= {n for n in seg.tail if n.op != "get_attr"}
        seg.nodes = sorted(members, key=position.__getitem__)
        inputs = {a for n in seg.nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
        seg.inputs = sorted(inputs, key=position.__getitem__)
    needed = {a for a in out.all_input_nodes}
    for seg in reversed(segments):
        seg.outputs = [n for n in seg.real if n in needed] + seg.tail
        needed |= set(seg.inputs)


def _module(gm: fx.GraphModule, seg: _Segment, index: int) -> fx.GraphModule:
    """The segment as a GraphModule returning a tuple; get_attr nodes make it share the
    model's own parameter and buffer tensors (GraphModule copies attribute references)."""
    g = fx.Graph()
    env: dict = {}
    for inp in seg.inputs:
        env[inp] = g.placeholder(inp.name)
        env[inp].meta = dict(inp.meta)

    def value(a: fx.Node) -> fx.Node:
        if a not in env:  # a get_attr: every segment that reads it reads the same tensor
            env[a] = g.get_attr(a.target)
            env[a].meta = dict(a.meta)
        return env[a]

    for n in seg.nodes:
        env[n] = g.node_copy(n, value)
    g.output(tuple(value(o) for o in seg.outputs))
    return fx.GraphModule(gm, g, class_name=f"{seg.kind.capitalize()}Segment{index}")


def _example(n: fx.Node):
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return torch.zeros(tuple(val.shape), dtype=val.dtype, device=val.device)  # export only reads its metadata
    return val


def _key(seg: _Segment) -> tuple:
    return tuple(tuple(n.name for n in ns) for ns in (seg.nodes, seg.inputs, seg.outputs))


def _build(gm, kinds, reasons, options, compile_fn) -> list[_Segment]:
    """Plan, then compile every megakernel segment. A segment capture still refuses (something the
    probe cannot see from one node) runs eagerly instead, and the plan is made again."""
    compiled: dict = {}
    while True:
        segments = _plan(gm, kinds)
        failed = None
        for i, seg in enumerate(segments):
            module = _module(gm, seg, i)
            if seg.kind == EAGER:
                seg.runner = module
                continue
            key = _key(seg)
            if key not in compiled:
                try:
                    compiled[key] = compile_fn(module, [_example(n) for n in seg.inputs], **options)
                except UnsupportedOpError as e:
                    failed = (seg, str(e).splitlines()[0])
                    break
            seg.runner = compiled[key]
        if failed is None:
            return segments
        seg, message = failed
        for n in seg.real:
            if kinds[n] == MEGAKERNEL:
                kinds[n] = EAGER
                reasons[n] = f"its megakernel segment could not be compiled: {message}"


def _describe(kinds: dict, reasons: dict) -> list[tuple[str, str, str]]:
    """(op, source line, why) of every node that runs eagerly because mkcompiler refused it."""
    rows = []
    for n, why in reasons.items():
        if kinds.get(n) == EAGER:
            rows.append((str(n.target), cap.user_source(n), why))
    return rows


def _warning(rows: list, num_megakernels: int) -> str:
    lines = [
        f"mkcompiler: fallback='eager' runs {len(rows)} op(s) in eager PyTorch, around {num_megakernels} megakernel(s):"
    ]
    for op, where, why in rows:
        detail = "" if why == f"the op {op}" else f" ({why})"
        lines.append(f"  {op}{detail}" + (f"\n    at {where}" if where else ""))
    return "\n".join(lines)


def compile_with_fallback(model: torch.nn.Module, example_inputs: tuple, options: dict, compile_fn):
    """`compile_fn(module, inputs, **options)` compiles one megakernel segment (api.compile)."""
    gm = _export(model, example_inputs)
    kinds, reasons = _probe(gm)
    options = {**options, "fallback": "error"}
    segments = _build(gm, kinds, reasons, options, compile_fn)
    rows = _describe(kinds, reasons)
    num_megakernels = sum(s.kind == MEGAKERNEL for s in segments)
    if rows:
        warnings.warn(_warning(rows, num_megakernels), FallbackWarning, stacklevel=3)
    return SegmentedModel(gm, segments, rows)


# ---- the compiled model ----


def _megakernel_inputs(values: list) -> list:
    """A megakernel takes contiguous inputs in memory of their own: values from eager segments
    may be strided, or views of one another."""
    out, storages = [], set()
    for v in values:
        if isinstance(v, torch.Tensor):
            v = v.contiguous()
            ptr = v.untyped_storage().data_ptr()
            if ptr in storages and v.numel():
                v = v.clone()
            storages.add(v.untyped_storage().data_ptr())
        out.append(v)
    return out


class SegmentedModel:
    """A model compiled with fallback="eager": megakernel segments and eager segments run in
    turn, one call at a time. `segments` lists (kind, Megakernel or GraphModule) in run order;
    `fallen_back` lists (op, source line, why) of what runs eagerly because mkcompiler refused it."""

    def __init__(self, gm: fx.GraphModule, segments: list[_Segment], fallen_back: list):
        self._segments = segments
        self.fallen_back = fallen_back
        self._placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._outputs = list(_output_node(gm.graph).args[0])
        self._in_spec = gm._in_spec
        self._out_spec = gm._out_spec
        self._lock = threading.Lock()

    @property
    def segments(self) -> list[tuple[str, object]]:
        return [(s.kind, s.runner) for s in self._segments]

    @property
    def megakernels(self) -> list:
        return [s.runner for s in self._segments if s.kind == MEGAKERNEL]

    def _first_megakernel(self, what: str):
        if not self.megakernels:
            raise AttributeError(f"{what}: this model has no megakernel segment (every op runs eagerly)")
        return self.megakernels[0]

    @property
    def source(self) -> str:
        """The first megakernel segment's Triton source (see `megakernels` for the others)."""
        return self._first_megakernel("source").source

    @property
    def queue(self):
        return self._first_megakernel("queue").queue

    @property
    def dag(self):
        return self._first_megakernel("dag").dag

    def poison(self, value: float = float("nan")) -> None:
        for mk in self.megakernels:
            mk.poison(value)

    def __repr__(self):
        kinds = ", ".join(s.kind for s in self._segments)
        return f"<SegmentedModel {len(self._segments)} segments ({kinds}); {len(self.fallen_back)} ops run eagerly>"

    def _check_inputs(self, args: tuple, kwargs: dict) -> list:
        """The call's flat inputs, once checked against the example inputs' structure and metadata."""
        flat = flatten_call(args, kwargs, self._in_spec, [p.name for p in self._placeholders])
        for i, (t, p) in enumerate(zip(flat, self._placeholders)):
            val = p.meta.get("val")
            if isinstance(val, torch.Tensor):
                check_input(t, f"input {i} ({p.name!r})", tuple(val.shape), val.dtype, val.device)
        return flat

    def __call__(self, *args, **kwargs):
        flat = self._check_inputs(args, kwargs)  # before anything runs: a refused call changes no state
        with self._lock:
            env = dict(zip(self._placeholders, flat))
            for seg in self._segments:
                values = [env[n] for n in seg.inputs]
                if seg.kind == MEGAKERNEL:
                    values = _megakernel_inputs(values)
                env.update(zip(seg.outputs, seg.runner(*values)))
            flat_out = [env[o] if isinstance(o, fx.Node) else o for o in self._outputs]
        return pytree.tree_unflatten(flat_out, self._out_spec)
