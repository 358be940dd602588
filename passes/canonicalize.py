"""Canonicalisation: recognise a computation by its math and give it the op the fusions expect.

Model code writes one layer many ways: an RMSNorm as `x * rsqrt(mean(x^2) + eps) * w` or
`x / sqrt(sum(x * x) / n + eps)`, with casts anywhere, the weight before or after the cast; a
LayerNorm with `var`, `(x - mu) ** 2` or E[x^2] - mu^2; softmax as `exp(x - max) / sum`; silu as
`x * sigmoid(x)` or `x / (1 + exp(-x))`. Each rule here rewrites such a subgraph into the one op
(or op sequence) that the canonical spelling (F.rms_norm, F.layer_norm, torch.softmax, F.silu,
...) lowers to, so that every spelling gets the same fused structure.

Where: the first pass of passes/pipeline.PIPELINE, on the op graph capture made. Every target and
every capture path (torch.export on the interpreter or a GPU, the torch.compile backend, tensor-
parallel shards) goes through it, so the structure does not depend on how the device decomposes an
op; capture also keeps `aten.rms_norm` whole (frontend/capture._decompositions) for the same reason.

How (matching by the computation, not by op order): the value an elementwise op computes is
normalised into a polynomial (`Poly`) over atoms: leaves (values read from buffers), row sums and
maxima, exp and other functions, and powers of sums (`grp`). Sums are flat and sorted, products
are sorted powers, a row sum is linear (a row-constant factor comes out of it, mean is sum / n),
exp of a sum is a product of exps, casts between float dtypes are transparent (the canonical op
computes in fp32 and rounds once, at its output). Two spellings of one computation then have equal
polynomials. A rule guesses the roles (which buffer is x, which column vector is the weight, what
eps is) from the polynomial, builds the canonical computation's polynomial from those roles with
the same algebra, and rewrites only if the two are equal: the guess is a heuristic, the equality
is the check.

Values are seen in a frame of R rows of C columns (the root op's output, last dim = row): every
view an op reads is reshaped to [R, C] and keyed by (buffer, offset, row stride, column stride),
so keepdim, unsqueeze and broadcasting do not matter; a row statistic is a view with column
stride 0, a weight one with row stride 0.

RULES lists the rewrites in order; each is a function Graph -> Graph, so a module's own rules
(passes/canon_attention.RULES, passes/canon_rope.RULES) join with one import and one entry.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from mkcompiler.ops.elementwise import ElementwiseAttrs, op_names
from mkcompiler.ops.norm import NormAttrs
from mkcompiler.ops.reduce import ReduceAttrs, RowAttrs
from mkcompiler.passes import canon_attention, canon_rope
from mkcompiler.passes.cleanup import eliminate_dead_ops

from mkcompiler.ir.graph import BufferKind, Graph, OpNode, View

# ---- the algebra ----
# Atom: ("leaf", level, key) | ("sum", Poly) | ("amax", Poly) | ("fn", name, *Poly) | ("grp", Poly)
# Mono: tuple of (atom, exponent) sorted by atom; Poly: tuple of (mono, coefficient) sorted by mono.
# Level bits: COLS (varies along a row), ROWS (varies from row to row).
COLS, ROWS = 1, 2
MAX_TERMS = 64  # a polynomial with more terms is not a pattern of ours (bounds expansion)
MAX_DEPTH = 14  # ops between a root and the farthest value of its region (a LayerNorm spans 10)


class GiveUp(Exception):
    """The value has no polynomial form here (a negative base to a fractional power, a blow-up)."""


def _r(x: float) -> float:
    """A coefficient or exponent: NaN (inf - inf, 0 * inf) has no polynomial form."""
    if math.isnan(x):
        raise GiveUp
    return x


def same(a, b) -> bool:
    """Polynomials (or parts of them) equal up to float rounding: spellings that compute a
    constant in another order (x / sqrt(2) against x * 0.7071...) differ in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def const(c: float) -> tuple:
    return (((), _r(c)),) if c else ()


def _poly(terms: dict) -> tuple:
    scale = max((abs(c) for c in terms.values()), default=0.0)
    out = []
    for m, c in terms.items():
        c = _r(c)
        if c and abs(c) > 1e-12 * scale:
            out.append((m, c))
    if len(out) > MAX_TERMS:
        raise GiveUp
    return tuple(sorted(out))


def atom(a, e: float = 1.0) -> tuple:
    return ((((a, _r(e)),), 1.0),)


def add(*ps) -> tuple:
    terms: dict = {}
    for p in ps:
        for m, c in p:
            terms[m] = terms.get(m, 0.0) + c
    return _poly(terms)


def _mono_mul(m1, m2) -> tuple:
    exps = dict(m1)
    for a, e in m2:
        exps[a] = _r(exps.get(a, 0.0) + e)
    return tuple(sorted((a, e) for a, e in exps.items() if e))


def mul(*ps) -> tuple:
    out = const(1.0)
    for p in ps:
        terms: dict = {}
        for m1, c1 in out:
            for m2, c2 in p:
                m = _mono_mul(m1, m2)
                terms[m] = terms.get(m, 0.0) + c1 * c2
        out = _poly(terms)
    return out


def neg(p) -> tuple:
    return mul(const(-1.0), p)


def _positive(a) -> bool:
    return a[0] == "fn" and a[1] == "exp"


def power(p, e: float) -> tuple:
    if e == 1:
        return p
    if not p:
        if e > 0:
            return p
        raise GiveUp
    if len(p) == 1:
        ((m, c),) = p
        if c < 0 and e != int(e):
            raise GiveUp
        out = []
        for a, ae in m:
            ne = ae * e
            # (a^2)^(1/2) is |a|: an even power's base keeps its sign only inside abs (where a
            # is negative, a's other powers are NaN or of one sign with the result: no wrap)
            if not _positive(a) and ae % 2 == 0 and ne % 2 != 0:
                a = ("fn", "abs", atom(a))
            out.append(atom(a, ne))
        return mul(const(c**e), *out)
    if e == int(e) and 1 < e <= 4:
        return mul(*[p] * int(e))
    # A power of a sum: scaled so that its first term's coefficient is 1 (k^e comes out).
    k = abs(p[0][1])
    return mul(const(k**e), atom(("grp", mul(const(1.0 / k), p)), e))


def fn(name: str, *args) -> tuple:
    return atom(("fn", name, *args))


def exp(p) -> tuple:
    """exp of a sum is the product of exps; exp(c m) is exp(m)^c, exp(c log(q)) is q^c."""
    out = [const(1.0)]
    for m, c in p:
        if not m:
            if c > 700:
                raise GiveUp
            out.append(const(math.exp(c)))
        elif len(m) == 1 and m[0][1] == 1 and m[0][0][:2] == ("fn", "log"):
            out.append(power(m[0][0][2], c))
        else:
            out.append(atom(("fn", "exp", ((m, 1.0),)), c))
    return mul(*out)


def log(p) -> tuple:
    """log of a monomial: its coefficient's and its exps' logs come out (both exact); log of a
    sum is the log of its scaled form plus the scale's."""
    if not p:
        raise GiveUp
    if len(p) > 1:
        k = abs(p[0][1])
        return add(const(math.log(k)), fn("log", mul(const(1.0 / k), p)))
    ((m, c),) = p
    if c <= 0:
        raise GiveUp
    parts = [const(math.log(c))]
    rest = []
    for a, e in m:
        if _positive(a):
            parts.append(mul(const(e), a[2]))
        else:
            rest.append((a, e))
    if rest:
        parts.append(fn("log", ((tuple(rest), 1.0),)))
    return add(*parts)


def sigmoid(p) -> tuple:
    return power(add(const(1.0), exp(neg(p))), -1.0)


def tanh(p) -> tuple:
    return add(mul(const(2.0), sigmoid(mul(const(2.0), p))), const(-1.0))


def odd(name: str, p) -> tuple:
    """An odd function (erf): f(-x) = -f(x), so the argument's first coefficient is made positive."""
    if p and p[0][1] < 0:
        return neg(fn(name, neg(p)))
    return fn(name, p)


def silu(p) -> tuple:
    return mul(p, sigmoid(p))


def gelu(p) -> tuple:
    return mul(const(0.5), p, add(const(1.0), odd("erf", mul(p, const(0.7071067811865476)))))


def gelu_tanh(p) -> tuple:
    inner = add(p, mul(const(0.044715), power(p, 3.0)))
    return mul(const(0.5), p, add(const(1.0), tanh(mul(const(0.7978845608028654), inner))))


def level(a) -> int:
    if a[0] == "leaf":
        return a[1]
    if a[0] in ("sum", "amax"):
        return poly_level(a[1]) & ROWS
    if a[0] == "grp":
        return poly_level(a[1])
    return max((poly_level(x) for x in a[2:]), default=0) if a[2:] else 0


def poly_level(p) -> int:
    lv = 0
    for m, _ in p:
        for a, _ in m:
            lv |= level(a)
    return lv


def row_sum(p, cols: int) -> tuple:
    """Sum over a row: linear; factors constant along the row come out of it."""
    out = []
    for m, c in p:
        inner = tuple((a, e) for a, e in m if level(a) & COLS)
        outer = tuple((a, e) for a, e in m if not level(a) & COLS)
        if inner:
            out.append(mul(const(c), ((outer, 1.0),), atom(("sum", ((inner, 1.0),)))))
        else:
            out.append(mul(const(c * cols), ((outer, 1.0),)))
    return add(*out)


def row_max(p) -> tuple:
    return atom(("amax", p))


# name -> the algebra of an ops/elementwise.py op (casts are handled apart)
UNARY: dict[str, Callable] = {
    "neg": neg,
    "exp": exp,
    "log": log,
    "sqrt": lambda p: power(p, 0.5),
    "rsqrt": lambda p: power(p, -0.5),
    "reciprocal": lambda p: power(p, -1.0),
    "sigmoid": sigmoid,
    "silu": silu,
    "tanh": tanh,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "erf": lambda p: odd("erf", p),
    "exp2": lambda p: exp(mul(const(math.log(2.0)), p)),
    "log2": lambda p: mul(const(1.0 / math.log(2.0)), log(p)),
}
BINARY: dict[str, Callable] = {
    "add": add,
    "sub": lambda a, b: add(a, neg(b)),
    "mul": mul,
    "div": lambda a, b: mul(a, power(b, -1.0)),
}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ---- values in a frame of R rows x C columns ----


def frame_key(v: View, rows: int, cols: int) -> tuple:
    """A view read as [rows, cols]: ("f", buffer, offset, row stride, column stride) (a stride of
    a size-1 dim is 0), or ("v", buffer, offset, shape, strides) when it has no such form."""
    f = v.reshape((rows, cols)) if v.numel == rows * cols else None
    if f is None:
        return ("v", v.buffer, v.offset, v.shape, v.strides)
    return ("f", v.buffer, f.offset, f.strides[0] if rows > 1 else 0, f.strides[1] if cols > 1 else 0)


def key_level(key) -> int:
    if key[0] == "v":
        return COLS | ROWS
    return (COLS if key[4] else 0) | (ROWS if key[3] else 0)


def leaf(key) -> tuple:
    return atom(("leaf", key_level(key), key))


@dataclass
class Frame:
    """The region of one root op and the polynomials of its values. The region is walked breadth
    first from the root, to MAX_DEPTH ops deep (values farther away are leaves: a residual
    stream's long chain of adds is not walked); `stops`: keys that are leaves even where an op
    of the region computes them (the role a rule tries, e.g. x)."""

    graph: Graph
    writers: dict[int, OpNode]  # buffer -> the elementwise/reduce op writing all of it, alone
    rows: int
    cols: int
    stops: frozenset = frozenset()
    depth: dict[tuple, int] = field(default_factory=dict)  # key read -> its distance from the root
    inputs: dict[tuple, list[tuple]] = field(default_factory=dict)  # key expanded -> its op's input keys
    ops: dict[tuple, OpNode] = field(default_factory=dict)  # key expanded -> the op computing it
    memo: dict[tuple, tuple] = field(default_factory=dict)

    def walk(self, root: OpNode) -> tuple:
        """Walk the region of `root`; returns the root's key."""
        start = frame_key(root.outputs[0], self.rows, self.cols)
        self.depth[start] = 0
        todo = deque([start])
        while todo:
            key = todo.popleft()
            op = self._expandable(key) if self.depth[key] < MAX_DEPTH else None
            if op is None:
                continue
            width = self.cols if op.kind == "elementwise" and op.outputs[0].numel > self.rows else 1
            views = op.inputs if op.kind == "elementwise" else op.inputs[:1]
            self.ops[key] = op
            self.inputs[key] = [frame_key(v, self.rows, self.cols if op.kind == "reduce" else width) for v in views]
            for k in self.inputs[key]:
                if k not in self.depth:
                    self.depth[k] = self.depth[key] + 1
                    todo.append(k)
        return start

    def _expandable(self, key) -> OpNode | None:
        """The op computing `key` in this frame, if it is expanded: it writes all of the key's
        buffer, as a full [R, C] value or a row statistic read as such."""
        op = self.writers.get(key[1]) if key[0] == "f" else None
        if op is None or key in self.stops:
            return None
        n, r, c = op.outputs[0].numel, self.rows, self.cols
        full = n == r * c and key[2:] == (0, c if r > 1 else 0, 1 if c > 1 else 0)
        row = n == r and c > 1 and key[2:] == (0, 1 if r > 1 else 0, 0)
        if op.kind == "reduce":
            x = op.inputs[0]
            return op if row and x.numel == r * c and x.shape[-1] == c else None
        return op if full or row else None

    def poly(self, root: OpNode) -> tuple:
        """The root's polynomial (raises GiveUp)."""
        return self.value(self.walk(root))

    def value(self, key) -> tuple:
        if key not in self.memo:
            self.memo[key] = self._compute(key)
        return self.memo[key]

    def _compute(self, key) -> tuple:
        op = self.ops.get(key)
        if op is None:
            return leaf(key)
        ins = [self.value(k) for k in self.inputs[key]]
        if op.kind == "elementwise":
            return self._expr(op.attrs.expr, ins, op.inputs)
        if op.attrs.mode == "amax":
            return row_max(ins[0])
        total = row_sum(ins[0], self.cols)
        return mul(const(1.0 / self.cols), total) if op.attrs.mode == "mean" else total

    def reads(self) -> Counter:
        """key -> how many times the region's ops read it."""
        return Counter(k for keys in self.inputs.values() for k in keys)

    def reduced(self) -> set[tuple]:
        """The keys the inputs of the region's row reductions are computed from (themselves too)."""
        todo = [ks[0] for k, ks in self.inputs.items() if self.ops[k].kind == "reduce"]
        found: set[tuple] = set()
        while todo:
            k = todo.pop()
            if k not in found:
                found.add(k)
                todo += self.inputs.get(k, [])
        return found

    def consts(self) -> set[float]:
        """The constants of the region's expressions."""
        return {c for op in self.ops.values() if op.kind == "elementwise" for c in _consts(op.attrs.expr)}

    def _expr(self, e, ins, views) -> tuple:
        tag = e[0]
        if tag == "in":
            return ins[e[1]]
        if tag == "const":
            return const(e[1])
        if tag != "op":
            raise GiveUp  # positional leaves: only meaningful in their own op
        _, name, dtype, *args = e
        vals = [self._expr(a, ins, views) for a in args]
        if name == "copy":
            src = _expr_dtype(args[0], views)
            return vals[0] if dtype in FLOATS and src in FLOATS else fn(f"to_{dtype}", vals[0])
        if name in UNARY and len(vals) == 1:
            return UNARY[name](vals[0])
        if name in BINARY and len(vals) == 2:
            return BINARY[name](*vals)
        if name == "pow" and args[1][0] == "const":
            return power(vals[0], args[1][1])
        return fn(name, *vals)


def _consts(e):
    if e[0] == "const":
        yield e[1]
    elif e[0] == "op":
        for a in e[3:]:
            yield from _consts(a)


def _expr_dtype(e, views):
    if e[0] == "in":
        return views[e[1]].dtype
    if e[0] == "op":
        return e[2]
    return torch.float32


def _writes_all_of(graph: Graph, op: OpNode) -> bool:
    """op is an elementwise or reduce op writing the whole of one buffer, not model state."""
    o = op.outputs[0]
    return (
        op.kind in ("elementwise", "reduce")
        and len(op.outputs) == 1
        and o.offset == 0
        and o.is_contiguous()
        and o.numel == graph.buffers[o.buffer].numel
        and graph.buffers[o.buffer].kind != BufferKind.STATE
    )


def sole_writers(graph: Graph) -> dict[int, OpNode]:
    """buffer -> the elementwise or reduce op writing all of it, where no other op writes it."""
    count = Counter(o.buffer for op in graph.ops for o in op.outputs)
    return {
        op.outputs[0].buffer: op for op in graph.ops if _writes_all_of(graph, op) and count[op.outputs[0].buffer] == 1
    }


# ---- the rewriting driver ----


@dataclass
class Match:
    """What a rule found at a root: the ops replacing it (writing its output) and the keys they
    read, x first."""

    ops: list[OpNode]
    reads: list[tuple]


@dataclass
class Site:
    """A root op (an elementwise op, sole writer of its output), its frame, and the candidate keys
    for the main operand x: values the root's region reads, farthest first (the widest match
    wins: softmax(x), not softmax(x - max(x)))."""

    graph: Graph
    writers: dict[int, OpNode]
    root: OpNode
    rows: int
    cols: int
    candidates: list[tuple] = field(default_factory=list)
    reads: Counter = field(default_factory=Counter)  # Frame.reads of the region (no stops)
    reduced: set[tuple] = field(default_factory=set)  # Frame.reduced of the region
    consts: set[float] = field(default_factory=set)  # Frame.consts of the region

    def frame(self, stops=()) -> Frame:
        """The root's region, walked, with `stops` leaves."""
        frame = Frame(self.graph, self.writers, self.rows, self.cols, frozenset(stops))
        frame.walk(self.root)
        return frame

    def poly(self, x) -> tuple | None:
        """The root's polynomial with x a leaf, or None."""
        try:
            return Frame(self.graph, self.writers, self.rows, self.cols, frozenset({x})).poly(self.root)
        except GiveUp:
            return None

    def view(self, key, shape=None) -> View:
        """The [R, C] view a frame key stands for, in `shape` where it reshapes."""
        dtype = self.graph.buffers[key[1]].dtype
        v = View(key[1], dtype, (self.rows, self.cols), (key[3], key[4]), key[2])
        return (v.reshape(shape) or v) if shape is not None else v

    def column(self, key) -> View:
        """The [C] view of a key constant down the columns (a weight, a bias)."""
        return View(key[1], self.graph.buffers[key[1]].dtype, (self.cols,), (key[4],), key[2])

    def out(self) -> View:
        """The root's output, as a row op's output ([R, C] beyond the kernels' 4 dims)."""
        out = self.root.outputs[0]
        return out if 1 <= out.rank <= 4 else out.reshape((self.rows, self.cols))

    def op(self, kind: str, inputs, attrs, outputs=None) -> OpNode:
        root = self.root
        return OpNode(kind, tuple(inputs), tuple(outputs or (self.out(),)), attrs, name=root.name, source=root.source)


def _site(graph: Graph, writers, root: OpNode) -> Site | None:
    out = root.outputs[0]
    if writers.get(out.buffer) is not root:
        return None
    cols = out.shape[-1] if out.rank else 1
    site = Site(graph, writers, root, out.numel // max(cols, 1), cols)
    frame = site.frame()
    site.reads, site.reduced, site.consts = frame.reads(), frame.reduced(), frame.consts()
    for _, k in sorted(((d, k) for k, d in frame.depth.items() if d > 0 and k[0] == "f"), reverse=True):
        src = _through_widening_cast(graph, writers, k, site.rows, site.cols)
        if src != k:  # the source stands for the cast value in the rules' filters too
            site.reads[src] = max(site.reads[src], site.reads[k])
            if k in site.reduced:
                site.reduced.add(src)
        if src not in site.candidates:
            site.candidates.append(src)
    return site


def _through_widening_cast(graph, writers, key, rows, cols):
    """A float value cast up (bf16 -> fp32) is exactly its source: the source, read in fewer bytes."""
    op = writers.get(key[1])
    if op is None or op.kind != "elementwise" or op.outputs[0].numel != rows * cols:
        return key
    if key[2:] != (0, cols if rows > 1 else 0, 1 if cols > 1 else 0):
        return key
    e = op.attrs.expr
    if e[0] != "op" or e[1] != "copy" or e[3] != ("in", 0):
        return key
    src, dst = op.inputs[0].dtype, e[2]
    if src in FLOATS and dst in FLOATS and src.itemsize <= dst.itemsize:
        return frame_key(op.inputs[0], rows, cols)
    return key


def _live_buffers(graph: Graph) -> set[int]:
    live = {v.buffer for v in graph.outputs if isinstance(v, View)}
    live |= {b.id for b in graph.buffers if b.kind == BufferKind.STATE}
    for op in reversed(graph.ops):
        if any(o.buffer in live for o in op.outputs):
            live.update(v.buffer for v in op.inputs if v is not None)
    return live


def _reads_same_values(graph: Graph, site: Site, found: Match, rewritten: set[int]) -> bool:
    """The new ops, at the root's place, read what the region's ops read: a buffer written more
    than once (`rewritten`: model state updated in place, a cat's pieces) is not written from
    the region's first op to the root."""
    bufs = {k[1] for k in found.reads if k is not None} & rewritten
    if not bufs:
        return True
    region = {id(op) for op in site.frame({found.reads[0]}).ops.values()}
    between = []
    for op in graph.ops:
        if id(op) in region or between:
            between.append(op)
        if op is site.root:
            break
    return not any(o.buffer in bufs for op in between[:-1] for o in op.outputs)


def _roots_near(readers: dict, anchor: OpNode, depth: int) -> list[OpNode]:
    """The elementwise ops within `depth` readers of `anchor` (it too)."""
    roots: dict[int, OpNode] = {}
    front = [anchor]
    for _ in range(depth + 1):
        nxt: dict[int, OpNode] = {}
        for r in front:
            if r.kind == "elementwise":
                roots[id(r)] = r
            for o in r.outputs:
                nxt.update((id(u), u) for u in readers.get(o.buffer, []) if u.kind in ("elementwise", "reduce"))
        front = list(nxt.values())
    return list(roots.values())


def rewrite_near(
    graph: Graph, anchor: Callable[[OpNode], bool], match: Callable[[Site], Match | None], depth: int
) -> Graph:
    """Try `match` at the elementwise ops within `depth` readers of each anchor op (the anchor
    too). Anchors in program order (an earlier pattern is rewritten before a later one's region
    takes it in); an anchor's roots latest first (the widest pattern wins: a norm with its weight
    and bias before the bare norm); ops a rewrite left without readers are skipped."""
    readers = graph.readers()
    anchors = [op for op in graph.ops if anchor(op)]
    if not anchors:
        return graph
    near = {id(a): _roots_near(readers, a, depth) for a in anchors}
    writers, live = sole_writers(graph), _live_buffers(graph)
    count = Counter(o.buffer for op in graph.ops for o in op.outputs)
    rewritten = {b for b, n in count.items() if n > 1} | {b.id for b in graph.buffers if b.kind == BufferKind.STATE}
    order = {id(op): i for i, op in enumerate(graph.ops)}
    for a in anchors:
        for root in sorted(near[id(a)], key=lambda op: -order[id(op)]):
            if root.outputs[0].buffer not in live or writers.get(root.outputs[0].buffer) is not root:
                continue
            site = _site(graph, writers, root)
            found = match(site) if site is not None else None
            if found is None or not _reads_same_values(graph, site, found, rewritten):
                continue
            pos = graph.ops.index(root)
            graph.ops[pos : pos + 1] = found.ops
            del writers[root.outputs[0].buffer]
            writers.update((op.outputs[0].buffer, op) for op in found.ops if _writes_all_of(graph, op))
            order.update((id(op), order[id(root)]) for op in found.ops)
            live = _live_buffers(graph)
    return graph


def _is_reduce(op: OpNode) -> bool:
    return op.kind == "reduce" and op.attrs.mode in ("sum", "mean", "amax")


# ---- norms ----


def norm_poly(x, cols: int, rms: bool, eps: float, w=None, b=None) -> tuple:
    """The canonical norm of x's rows (ops/norm.norm_reference) as a polynomial."""
    mean = mul(const(1.0 / cols), row_sum(x, cols))
    d = x if rms else add(x, neg(mean))
    y = mul(d, power(add(mul(const(1.0 / cols), row_sum(mul(d, d), cols)), const(eps)), -0.5))
    if w is not None:
        y = mul(y, w)
    return add(y, b) if b is not None else y


def _eps_candidates(p, x, cols: int, consts) -> list[float]:
    """eps from each power -1/2 of a sum holding sum(x^2): (sum(x^2)/C + ... + eps) scaled to
    1 + k sum(x^2) + ..., so eps = 1 / (C k); snapped to the region's constant it came from
    (k is rounded)."""
    s2 = row_sum(mul(x, x), cols)[0][0]
    found = []
    for m, _ in p:
        for a, e in m:
            if a[0] != "grp" or e != -0.5 or a[1][0][0] != ():
                continue
            k = dict(a[1]).get(s2)
            if k is None or k <= 0:
                continue
            eps = 1.0 / (cols * k)
            near = [c for c in consts if abs(c - eps) <= 1e-8 * eps]
            eps = near[0] if near else float(f"{eps:.9g}")
            if eps not in found:
                found.append(eps)
    return found


def _norm_roles(p, x, xk, cols: int) -> tuple[list, list, list]:
    """The norm kinds (rms), weights and biases worth trying for p: LayerNorm only where p sums x
    itself; a weight a column leaf in a term with x; a bias a column leaf alone in a term."""
    s1 = row_sum(x, cols)[0][0][0][0]
    rms = [True, False] if any(a == s1 for m, _ in p for a, _ in m) else [True]
    weights, biases = [None], [None]
    for m, _ in p:
        atoms = dict(m)
        if atoms.get(x[0][0][0][0]) == 1.0:
            weights += [a[2] for a, e in m if a[0] == "leaf" and a[1] == COLS and a[2] != xk and e == 1.0]
        if len(m) == 1 and m[0][1] == 1.0 and m[0][0][0] == "leaf" and m[0][0][1] == COLS:
            biases.append(m[0][0][2])
    return rms, list(dict.fromkeys(weights)), list(dict.fromkeys(biases))


def match_norm(site: Site) -> Match | None:
    if site.cols < 2:
        return None
    # x is read by the row reduction and by the product: twice at least
    for xk in [k for k in site.candidates if k in site.reduced and site.reads[k] >= 2]:
        p = site.poly(xk)
        if not p:
            continue
        x = leaf(xk)
        rms_options, weights, biases = _norm_roles(p, x, xk, site.cols)
        for eps in _eps_candidates(p, x, site.cols, site.consts):
            for rms in rms_options:
                for wk in weights:
                    for bk in biases:
                        w, b = (leaf(k) if k else None for k in (wk, bk))
                        if same(norm_poly(x, site.cols, rms, eps, w, b), p):
                            vw, vb = (site.column(k) if k else None for k in (wk, bk))
                            ins = (site.view(xk, site.out().shape), vw, vb)
                            return Match([site.op("norm", ins, NormAttrs(rms=rms, eps=eps))], [xk, wk, bk])
    return None


def canonicalize_norms(graph: Graph) -> Graph:
    """RMSNorm / LayerNorm written out -> one `norm` op (ops/norm.py), whatever the spelling."""
    return rewrite_near(graph, lambda op: op.kind == "reduce" and op.attrs.mode in ("sum", "mean"), match_norm, 10)


# ---- softmax and log-softmax ----


def softmax_poly(x, cols: int) -> tuple:
    return mul(exp(x), power(row_sum(exp(x), cols), -1.0))


def log_softmax_poly(x, cols: int) -> tuple:
    return add(x, neg(log(row_sum(exp(x), cols))))


def match_softmax(site: Site) -> Match | None:
    if site.cols < 2:
        return None
    for xk in [k for k in site.candidates if k in site.reduced]:
        try:
            want = softmax_poly(leaf(xk), site.cols)
        except GiveUp:
            continue
        if same(site.poly(xk), want):
            return Match([site.op("softmax", (site.view(xk, site.out().shape),), RowAttrs())], [xk])
    return None


def match_log_softmax(site: Site) -> Match | None:
    """log_softmax as torch.log_softmax lowers (max, exp(x - max), sum, x - max - log(sum)), its
    row statistics in fp32: one spelling, the numerically safe one, for every spelling."""
    if site.cols < 2:
        return None
    for xk in [k for k in site.candidates if k in site.reduced]:
        try:
            want = log_softmax_poly(leaf(xk), site.cols)
        except GiveUp:
            continue
        if not same(site.poly(xk), want):
            continue
        g, rows, cols, f32 = site.graph, site.rows, site.cols, torch.float32
        name = site.root.name
        m = g.new_tensor(f"{name}_max", (rows,), f32)
        s = g.new_tensor(f"{name}_sum", (rows,), f32)
        e = g.new_tensor(f"{name}_exp", (rows, cols), f32)
        m_rows, s_rows = (View(v.buffer, f32, (rows, cols), (1 if rows > 1 else 0, 0), 0) for v in (m, s))
        x = site.view(xk)
        shifted = ("op", "sub", f32, ("in", 0), ("in", 1))
        out = site.root.outputs[0].reshape((rows, cols))
        result = ("op", "sub", out.dtype, shifted, ("op", "log", f32, ("in", 2)))
        ops = [
            site.op("reduce", (x,), ReduceAttrs(mode="amax"), (m,)),
            site.op("elementwise", (x, m_rows), ElementwiseAttrs(("op", "exp", f32, shifted)), (e,)),
            site.op("reduce", (e,), ReduceAttrs(mode="sum"), (s,)),
            site.op("elementwise", (x, m_rows, s_rows), ElementwiseAttrs(result), (out,)),
        ]
        return Match(ops, [xk])
    return None


def canonicalize_softmax(graph: Graph) -> Graph:
    """exp(x - max) / sum -> one `softmax` op; log-softmax, written any way -> one op sequence."""
    graph = rewrite_near(graph, _is_reduce, match_softmax, 6)
    return rewrite_near(graph, _is_reduce, match_log_softmax, 6)


# ---- activations ----

ACTIVATIONS: dict[str, Callable] = {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh}
TRANSCENDENTAL = {"exp", "exp2", "sigmoid", "tanh", "erf", "silu", "gelu", "gelu_tanh"}


def _leaf_factors(p) -> dict:
    """The leaves that every term of p has as a factor, each with its least exponent."""
    common: dict | None = None
    for m, _ in p:
        here = {a: e for a, e in m if a[0] == "leaf" and e > 0}
        common = here if common is None else {a: min(e, here[a]) for a, e in common.items() if a in here}
    return common or {}


def _gated(p, act: tuple) -> tuple[float, dict] | None:
    """(c, rest) with p = act * c * (the product of leaves `rest`, integer powers), or None."""
    have, base = _leaf_factors(p), _leaf_factors(act)
    if any(a not in have for a in base):
        return None
    rest = {a: e - base.get(a, 0.0) for a, e in have.items() if e > base.get(a, 0.0)}
    if any(e != int(e) or a[2][0] != "f" for a, e in rest.items()):
        return None
    guess = mul(act, *(atom(a, e) for a, e in sorted(rest.items())))
    if not guess or not p:
        return None
    c = p[0][1] / guess[0][1]
    return (c, rest) if same(mul(const(c), guess), p) else None


def match_activation(site: Site) -> Match | None:
    """act(x) * c * (a product of leaves: swiglu's and geglu's up projection) -> one elementwise
    op computing the activation by name."""
    for xk in site.candidates:
        p = site.poly(xk)
        if not p:
            continue
        for name, act in ACTIVATIONS.items():
            try:
                found = _gated(p, act(leaf(xk)))
            except GiveUp:
                continue
            if found is not None:
                return _activation_op(site, name, xk, *found)
    return None


def _activation_op(site: Site, name: str, xk, c: float, rest: dict) -> Match | None:
    out = site.root.outputs[0]
    factors = sorted(rest.items())
    inputs = tuple(site.view(k, out.shape).expand(out.shape) for k in [xk] + [a[2] for a, _ in factors])
    f32 = torch.float32
    expr = ("op", name, f32, ("in", 0))
    for slot, (_, e) in enumerate(factors, start=1):
        for _ in range(int(e)):
            expr = ("op", "mul", f32, expr, ("in", slot))
    if not same(c, 1.0):
        expr = ("op", "mul", f32, expr, ("const", c))
    expr = expr[:2] + (out.dtype,) + expr[3:]  # rounded once, to the output's dtype
    root = site.root
    if root.attrs.expr == expr and root.inputs == inputs:
        return None  # already canonical
    return Match([site.op("elementwise", inputs, ElementwiseAttrs(expr), (out,))], [xk] + [a[2] for a, _ in factors])


def _has_transcendental(op: OpNode) -> bool:
    return op.kind == "elementwise" and any(n in TRANSCENDENTAL for n in op_names(op.attrs.expr))


def canonicalize_activations(graph: Graph) -> Graph:
    """silu, gelu (erf and tanh forms) and their gated forms (swiglu, geglu) written out -> the
    activation op by name."""
    return rewrite_near(graph, _has_transcendental, match_activation, 4)


# ---- the stage ----

# (name, rewrite), applied in order: norms and softmax before activations (a gelu after a written-out
# LayerNorm then reads the norm op's output as its x).
RULES: list[tuple[str, Callable[[Graph], Graph]]] = [
    ("norms", canonicalize_norms),
    ("softmax", canonicalize_softmax),
    ("activations", canonicalize_activations),
    *canon_attention.RULES,  # after softmax: they start from the softmax op
    *canon_rope.RULES,
]


def canonicalize(graph: Graph) -> Graph:
    """Apply RULES in order; the ops a rewrite leaves without readers are dropped after each."""
    for _, rule in RULES:
        graph = eliminate_dead_ops(rule(graph))
    return graph
