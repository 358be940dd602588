"""Capture: torch.export -> core ATen graph -> our op graph, through ops' lowering table.

Generic by construction: every ATen node is looked up in `ops.registry.LOWERINGS`; any
composition of supported ops compiles. Parameters and buffers are read in place (the
graph keeps references to the module's own tensors, never copies).
"""

from __future__ import annotations

import math
import operator
import re
import warnings

import torch
import torch._decomp
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from mkcompiler.errors import ModelError, UnsupportedOpError
from mkcompiler.frontend.checks import attribute_state, check_attributes_unchanged
from mkcompiler.frontend.complex_values import COMPLEX_LOWERINGS, Complex, involves_complex, lower_complex
from mkcompiler.ir.graph import BufferKind, Graph, OpNode, View
from mkcompiler.ops import registry
from mkcompiler.ops.base import ALIGN_BYTES, TL_DTYPE
from mkcompiler.ops.elementwise import VALUE_DTYPES, ElementwiseAttrs
from mkcompiler.ops.matmul import MatmulAttrs

IGNORED = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def user_source(fx_node) -> str:
    """'file:line: code' of the innermost stack frame outside torch, or ''."""
    trace = fx_node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', trace)
    user = [f for f in frames if "/torch/" not in f[0]]
    if not (user or frames):
        return ""
    path, line, code = (user or frames)[-1]
    return f"{path}:{line}: {code.strip()}"


def _at(fx_node) -> str:
    where = user_source(fx_node) if fx_node is not None else ""
    return f" at {where}" if where else ""


ROLES = {
    BufferKind.INPUT: "input",
    BufferKind.PARAM: "parameter",
    BufferKind.STATE: "model state",
    BufferKind.ACT: "intermediate",
    BufferKind.OUTPUT: "output",
}


class Refused:
    """Stands for a value we cannot produce; using it raises."""

    def __init__(self, what: str):
        self.what = what


class LoweringContext:
    """What a lowering function may do: make tensors, emit ops, and refuse clearly."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.fx_node = None

    # ---- errors ----
    def unsupported(self, node, what: str):
        """Raise UnsupportedOpError: its first line is this refusal (fallback.py reports it per op); then
        every op of the model with no lowering at all, each with its source line, and what to do."""
        node = node or self.fx_node
        first = f"mkcompiler cannot compile {what}"
        if node is not None and str(node.target) not in what:
            first += f" (ATen op {node.target}, node {node.name})"
        lines = [first + _at(node)]
        others = [n for n in _unlowerable_ops(node.graph) if n is not node] if node is not None else []
        if others:
            lines.append(f"  the model's other ops with no lowering ({len(others)}):")
            lines += [f"    {n.target} (node {n.name}){_at(n)}" for n in others]
        lines.append(
            '  compile with fallback="eager" to run what cannot compile in eager PyTorch between megakernels; '
            "`python -m mkcompiler ops` lists the supported ATen ops"
        )
        raise UnsupportedOpError("\n".join(lines))

    def refused(self, node, what: str) -> Refused:
        return Refused(what)

    # ---- tensors ----
    def new_output(self, node, index=None) -> View:
        val = node.meta["val"]
        if index is not None:
            val = val[index]
        return self.graph.new_tensor(node.name, tuple(val.shape), val.dtype)

    def writable_in_place(self, fx_node, base: View) -> bool:
        """Can `fx_node` (a functional update of `base`) write into base's storage? Only for
        model state or intermediates, and only if nothing later reads base's old value."""
        kind = self.graph.buffers[base.buffer].kind
        if kind not in (BufferKind.STATE, BufferKind.ACT):
            return False
        src = fx_node.args[0]
        return all(self.order[u] <= self.order[fx_node] for u in src.users)

    def row_input(self, v: View) -> View:
        """A view of rank <= 4 whose last dim is the row (leading dims merged when needed)."""
        if v.rank == 0:
            return v.reshape((1,))
        if v.rank <= 4:
            return v
        flat = v.reshape((-1, v.shape[-1]))
        return flat if flat is not None else self.copy(v).reshape((-1, v.shape[-1]))

    # ---- ops ----
    def emit(self, node, kind: str, inputs, outputs, attrs=None) -> OpNode:
        """Append an op; `attrs`: its family's attributes (ops/<family>.py), None for a family without any."""
        for x in inputs:
            if isinstance(x, Refused):
                self.unsupported(node, x.what)
        for v in (*inputs, *outputs):  # kernels load and store only these (int8, fp8, float64: fallback='eager')
            if isinstance(v, View) and v.dtype not in TL_DTYPE:
                buf = self.graph.buffers[v.buffer]
                self.unsupported(node, f"{kind} on the {v.dtype} {ROLES[buf.kind]} {buf.name!r}")
        op = OpNode(
            kind,
            tuple(inputs),
            tuple(outputs),
            attrs,
            name=node.name if node is not None else f"{kind}{len(self.graph.ops)}",
            source=user_source(node) if node is not None else "",
        )
        self.graph.ops.append(op)
        return op

    def emit_matmul(self, node, a: View, b: View, bias: View | None) -> View:
        if a.rank != 2 or b.rank != 2:
            self.unsupported(node, f"a matmul of ranks {a.rank} x {b.rank} (batched matmul)")
        out = self.graph.new_tensor(node.name, (a.shape[0], b.shape[1]), node.meta["val"].dtype)
        self.emit(node, "matmul", (a, b, bias), (out,), MatmulAttrs())
        return out

    def elementwise(self, node, name: str, *operands) -> View:
        tensors = [x for x in operands if isinstance(x, View)]
        for x in operands:
            if isinstance(x, Refused):
                self.unsupported(node, x.what)
        if node is not None:
            shape, dtype = tuple(node.meta["val"].shape), node.meta["val"].dtype
        else:
            shape = tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
            dtype = tensors[0].dtype
            for t in tensors[1:]:
                dtype = torch.promote_types(dtype, t.dtype)
        if dtype not in VALUE_DTYPES:
            self.unsupported(node, f"elementwise {name} producing {dtype}")
        inputs, leaves = [], []
        for x in operands:
            if isinstance(x, View):
                leaves.append(("in", len(inputs)))
                inputs.append(x.expand(shape))
            elif isinstance(x, (int, float, bool)):
                leaves.append(("const", float(x)))
            else:
                self.unsupported(node, f"elementwise {name} on a {type(x).__name__} operand")
        out = self.graph.new_tensor(node.name if node is not None else name, shape, dtype)
        self.emit(node, "elementwise", inputs, (out,), ElementwiseAttrs(("op", name, dtype, *leaves)))
        return out

    def copy(self, v: View) -> View:
        """A fresh contiguous copy of v."""
        out = self.graph.new_tensor("copy", v.shape, v.dtype)
        self.emit(None, "elementwise", (v,), (out,), ElementwiseAttrs(("op", "copy", v.dtype, ("in", 0))))
        return out

    def copy_into(self, src: View, dst: View, node=None):
        copy = ElementwiseAttrs(("op", "copy", dst.dtype, ("in", 0)))
        self.emit(node, "elementwise", (src.expand(dst.shape),), (dst,), copy)


def _module_tensors(model: torch.nn.Module, ep) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    tensors.update(getattr(ep, "constants", {}) or {})
    return tensors


def bound_tensor(name: str, t: torch.Tensor, kind: BufferKind = BufferKind.PARAM, stacklevel: int = 3) -> torch.Tensor:
    """The tensor a megakernel reads for a module tensor: itself (read in place), or a 16-byte
    aligned copy of a parameter; model state must be aligned, since it is updated in place."""
    t = t.detach()
    if t.data_ptr() % ALIGN_BYTES:  # kernels assume 16-byte aligned buffers (wide loads)
        if kind == BufferKind.STATE:
            raise UnsupportedOpError(f"model state {name!r} is not 16-byte aligned; it must be updated in place")
        warnings.warn(f"mkcompiler: copying {name!r}, which is not 16-byte aligned", stacklevel=stacklevel + 1)
        t = t.clone()
    return t


def _bind_param(graph: Graph, name: str, t: torch.Tensor, kind: BufferKind = BufferKind.PARAM) -> View | Complex:
    if t.is_complex():  # read in place through its (re, im) pairs (frontend/complex_values.py)
        return Complex.of_pairs(_bind_param(graph, name, torch.view_as_real(t), kind))
    t = bound_tensor(name, t, kind, stacklevel=3)
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    buf = graph.add_buffer(name, max(span, 1), t.dtype, kind)
    graph.params[buf.id] = t
    return View(buf.id, t.dtype, tuple(t.shape), tuple(t.stride()), 0)


# ---- models that would compile into a wrong answer (see also frontend/checks.py) ----

DROPOUT_OPS = {torch.ops.aten.native_dropout.default, torch.ops.aten.dropout.default}


def _check_no_dropout(model: torch.nn.Module, ep) -> None:
    """Dropout in training mode draws a new mask at every call: almost always a model left in
    train() by mistake (nn.Module's default)."""
    if not model.training:
        return
    for n in ep.graph.nodes:
        if n.op != "call_function" or n.target not in DROPOUT_OPS:
            continue
        p, train = n.args[1], n.args[2] if len(n.args) > 2 else True
        if p > 0 and train is not False:
            stack = list((n.meta.get("nn_module_stack") or {}).values())  # (module path, type), outermost first
            where = f" in module {stack[-1][0]!r}" if stack and stack[-1][0] else ""
            raise ModelError(
                f"the model is in training mode and applies dropout (p={p}){where}{_at(n)}: "
                "a megakernel for inference needs model.eval()"
            )


def capture(model: torch.nn.Module, example_inputs: tuple) -> Graph:
    """Export `model` and lower it into an op graph."""
    registry.load_all()
    before, seen = attribute_state(model), {}

    def after_forward(module, args, out) -> None:  # returns None: the output stays forward's
        seen.setdefault("after", attribute_state(module))

    hook = model.register_forward_hook(after_forward)
    with warnings.catch_warnings():  # torch.export's own deprecation chatter
        warnings.simplefilter("ignore", FutureWarning)
        try:
            ep = torch.export.export(model, tuple(example_inputs), strict=False)
        finally:
            hook.remove()
        check_attributes_unchanged(model, before, seen.get("after", before))
        _check_no_dropout(model, ep)
        ep = ep.run_decompositions(_decompositions())
    graph = Graph(out_spec=ep.call_spec.out_spec, in_spec=ep.call_spec.in_spec)
    ctx = LoweringContext(graph)
    ctx.order = {n: i for i, n in enumerate(ep.graph.nodes)}
    env: dict = {}
    module_tensors = _module_tensors(model, ep)
    user_inputs = iter(range(10**9))
    outputs = ep.graph_signature.output_specs
    state = {s.target for s in outputs if s.kind == OutputKind.BUFFER_MUTATION}
    refused = [s for s in outputs if s.kind not in (OutputKind.BUFFER_MUTATION, OutputKind.USER_OUTPUT)]
    if refused:
        raise UnsupportedOpError(
            f"mkcompiler cannot compile a model that mutates {refused[0].target} ({refused[0].kind})"
        )
    state_views: dict[str, View] = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            env[spec.arg.name] = ("user", next(user_inputs))
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            kind = BufferKind.STATE if spec.target in state else BufferKind.PARAM
            env[spec.arg.name] = _bind_param(graph, spec.target, module_tensors[spec.target], kind)
            if spec.target in state:
                state_views[spec.target] = env[spec.arg.name]
        else:
            raise UnsupportedOpError(f"mkcompiler cannot capture graph input kind {spec.kind}")
    flat_inputs = pytree.tree_leaves(tuple(example_inputs))
    for fx_node in ep.graph.nodes:
        ctx.fx_node = fx_node
        if fx_node.op == "placeholder":
            env[fx_node.name] = _bind_user_input(graph, ctx, fx_node, env[fx_node.name], flat_inputs)
        elif fx_node.op == "call_function":
            env[fx_node.name] = _lower_node(ctx, fx_node, env)
        elif fx_node.op == "output":
            values = [_output_value(ctx, fx_node, x, env) for x in fx_node.args[0]]
            for spec, v in zip(outputs, values):
                if spec.kind == OutputKind.BUFFER_MUTATION:
                    _write_back(ctx, v, state_views[spec.target])
            graph.outputs = [v for spec, v in zip(outputs, values) if spec.kind == OutputKind.USER_OUTPUT]
    return graph


# Core ATen ops with no lowering of their own, decomposed (torch._decomp) into ops that have one.
_aten = torch.ops.aten
EXTRA_DECOMPOSITIONS = (
    _aten.clamp.default,
    _aten.clamp.Tensor,
    _aten.clamp_min.default,
    _aten.clamp_max.default,
    _aten.hardtanh.default,
    _aten.leaky_relu.default,
    _aten.elu.default,
    _aten.softplus.default,
    _aten.hardswish.default,
    _aten.hardsigmoid.default,
    _aten._log_softmax.default,
    _aten.logsumexp.default,
)


def _decompositions():
    """Core ATen, but scaled_dot_product_attention stays whole (ops/attention.py lowers it), and
    so does rms_norm (ops/norm.py: one norm op on every target; a CUDA export keeps it whole as
    _fused_rms_norm, a CPU one would decompose it), and a few more ops decomposed
    (EXTRA_DECOMPOSITIONS)."""
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
    table.pop(torch.ops.aten.rms_norm.default, None)
    table.update(torch._decomp.get_decompositions(EXTRA_DECOMPOSITIONS))
    return table


def _write_back(ctx, value, state: View) -> None:
    """Make the state buffer hold `value` at the end of the step (in-place writes already do)."""
    if isinstance(value, View) and value == state:
        return
    if not isinstance(value, View):
        raise UnsupportedOpError("mkcompiler cannot write a non-tensor value back into model state")
    ctx.copy_into(value, state)


def _bind_user_input(graph, ctx, fx_node, bound, flat_inputs):
    if not (isinstance(bound, tuple) and bound[0] == "user"):
        return bound
    val = fx_node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        ctx.unsupported(fx_node, f"a non-tensor input {fx_node.name!r}")
    buf = graph.add_buffer(fx_node.name, max(math.prod(val.shape), 1), val.dtype, BufferKind.INPUT)
    graph.inputs.append((buf.id, tuple(val.shape), val.dtype))
    return View.full(buf, tuple(val.shape)) if val.dim() else View(buf.id, val.dtype, (), (), 0)


class Const:
    """A value computed at compile time (it depends on no input, parameter or state): masks
    built from shapes, position tables. Bound as a read-only buffer only if an op reads it."""

    def __init__(self, value: torch.Tensor):
        self.value = value
        self.view: View | None = None


def _map_arg(a, env, ctx=None):
    if isinstance(a, torch.fx.Node):
        v = env[a.name]
        if isinstance(v, Const) and ctx is not None:
            if v.view is None:
                v.view = _bind_param(ctx.graph, f"const_{a.name}", v.value)
            return v.view
        return v
    if isinstance(a, (list, tuple)):
        return type(a)(_map_arg(x, env, ctx) for x in a)
    return a


# Ops whose result depends only on their tensor argument's shape, dtype and device.
SHAPE_ONLY = {
    torch.ops.aten.full_like.default,
    torch.ops.aten.zeros_like.default,
    torch.ops.aten.ones_like.default,
}


def _fold(fx_node, env):
    """Evaluate a node whose tensor inputs are all compile-time constants (or that has none)."""
    nodes = [a for a in pytree.tree_leaves((fx_node.args, fx_node.kwargs)) if isinstance(a, torch.fx.Node)]
    shape_only = fx_node.target in SHAPE_ONLY
    if not shape_only and not all(isinstance(env[a.name], Const) for a in nodes):
        return None
    if fx_node.target in IGNORED or not isinstance(fx_node.meta.get("val"), torch.Tensor):
        return None

    def value(a):
        if not isinstance(a, torch.fx.Node):
            return a
        if shape_only:
            val = a.meta["val"]
            return torch.empty(val.shape, dtype=val.dtype, device=val.device)
        return env[a.name].value

    args = pytree.tree_map(value, fx_node.args)
    kwargs = pytree.tree_map(value, fx_node.kwargs)
    return Const(fx_node.target(*args, **kwargs))


def _unlowerable_ops(fx_graph) -> list:
    """The graph's ATen ops with no lowering that capture would not fold into a constant (one
    computing from no tensor that a placeholder, a user input or a parameter, provides)."""
    folds: dict = {}
    found = []
    for n in fx_graph.nodes:
        if n.op == "placeholder":
            folds[n] = False
        elif n.op == "call_function":
            inputs = n.all_input_nodes
            folds[n] = n.target in SHAPE_ONLY or all(folds.get(a, False) for a in inputs)
            lowered = n.target in registry.LOWERINGS or n.target in COMPLEX_LOWERINGS
            if n.target in IGNORED or n.target is operator.getitem or lowered:
                continue
            if not folds[n]:
                found.append(n)
    return found


def _lower_node(ctx, fx_node, env):
    target = fx_node.target
    if target in IGNORED:
        return None
    if target is operator.getitem:
        seq, i = fx_node.args
        return env[seq.name][i]
    folded = _fold(fx_node, env)
    if folded is not None:
        return folded
    args = _map_arg(fx_node.args, env, ctx)
    kwargs = {k: _map_arg(v, env, ctx) for k, v in fx_node.kwargs.items()}
    if involves_complex(fx_node, args, kwargs):
        return lower_complex(ctx, fx_node, args, kwargs)
    fn = registry.LOWERINGS.get(target)
    if fn is None:
        ctx.unsupported(fx_node, f"the op {target}")
    return fn(ctx, fx_node, *args, **kwargs)


def _output_value(ctx, fx_node, x, env):
    if isinstance(x, torch.fx.Node):
        v = _map_arg(x, env, ctx)
        if isinstance(v, Refused):
            ctx.unsupported(x, v.what)
        if isinstance(v, Complex):
            ctx.unsupported(x, "a complex model output (return torch.view_as_real of it)")
        return v
    return x
