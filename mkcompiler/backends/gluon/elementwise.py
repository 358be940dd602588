"""The elementwise family on the Gluon backend: a routine per opcode, the twin of
ops/elementwise.Elementwise.emit's, for contiguous and strided views and positional (cat) leaves.

The routine is built from the SAME line generators as the Triton one (ops/elementwise.py:
expr_source for the expression, input_loads for the loads with their windows and shared loads;
the index split over the key's shape), each line translated by `gluon_line`: the Gluon view
helpers (views.py) take the Triton helpers' arguments less the address table, and tl.<name>
becomes its Gluon twin. Only the skeleton differs: the instruction's args are read through its
index (`arg(row, ins, i)`, same arg numbers), BLOCK and the 1-D layout are constexprs of
the routine. So the index arithmetic of strided views and windows is the Triton routine's.

`gluon_source` / `gluon_line` also serve the scatter family (small_ops.py), whose values are an
elementwise expression too.
"""

from __future__ import annotations

import re

from mkcompiler.backends.gluon import tiles
from mkcompiler.backends.gluon.family import Emitted, GluonFamily, register
from mkcompiler.backends.gluon.views import VIEW_HELPERS
from mkcompiler.ir.queue import Queue
from mkcompiler.ops.base import tl_dtype
from mkcompiler.ops.elementwise import OPS, expr_source, input_loads, op_names

ELEMENTWISE = "elementwise"
VIEWS_MODULE = "mkcompiler.backends.gluon.views"
# Gluon's twins of what the elementwise templates call as tl.<name> and gl lacks (tiles.py)
LOCAL_FUNCTIONS = ("sigmoid",)
_TL_NAME = re.compile(r"\btl\.(\w+)")
# A bare leaf's tensor (expr_source) needs the routine's layout in Gluon.
_TL_ZEROS = "tl.zeros([BLOCK], tl.float32)"
_GL_ZEROS = "gl.zeros([BLOCK], gl.float32, layout=LAYOUT)"


def _gl_name(name: str) -> str | None:
    """The Gluon spelling of tl.<name> in generated code, or None when there is none."""
    if not tiles.HAVE_GLUON:
        return None
    if name in LOCAL_FUNCTIONS:
        return name
    from triton.experimental.gluon import language as gl

    return f"gl.{name}" if hasattr(gl, name) else None


def untranslatable(triton_src: str) -> list[str]:
    """The tl.<name>s of a line of Triton source that have no Gluon twin."""
    return [f"tl.{m}" for m in _TL_NAME.findall(triton_src) if _gl_name(m) is None]


def gluon_source(triton_src: str) -> str:
    """A line of Triton elementwise source (ops/elementwise.expr_source) in Gluon; GluonUnsupported
    names a tl function without a twin."""
    missing = untranslatable(triton_src)
    if missing:
        # imported here: codegen imports this module at its end (it registers the family)
        from mkcompiler.backends.gluon.codegen import GluonUnsupported

        raise GluonUnsupported(missing[0])
    return _TL_NAME.sub(lambda m: _gl_name(m.group(1)), triton_src)


def gluon_line(triton_line: str) -> str:
    """A generated line of a Triton tile routine in Gluon: the view helpers without the address
    table (views.py: both read a view's ADDR column), bare-leaf zeros in the routine's layout,
    tl names translated (gluon_source)."""
    return gluon_source(triton_line.replace("addrs_ptr, ", "").replace(_TL_ZEROS, _GL_ZEROS))


def expr_problem(expr) -> str | None:
    """Why an elementwise expression cannot be written in Gluon (None: it can)."""
    for name in dict.fromkeys(op_names(expr)):
        missing = untranslatable(OPS[name][0])
        if missing:
            return f"{name} ({missing[0]})"
    return None


def guarded(call: str) -> str:
    """A branch statement that runs `call` only while the worker's waits hold (ok == 0: a wait
    gave up; the tile reads and writes nothing, and never waits, so the worker ends)."""
    return f"if ok != 0:\n    {call}"


def elementwise_routine(key, name: str) -> str:
    """The Gluon twin of Elementwise.emit's routine (module docstring): the instruction's blocks
    of BLOCK elements; each input loaded at the output's linear index (contiguous views), or at
    the index split over the key's shape (strided views), or inside its window (cat leaves);
    the expression; the store."""
    n = len(key.in_dtypes)
    flat, shape = key.flat, key.shape
    vec = key.numel_div and all(f == 2 for f in flat)  # as Elementwise.emit: uniform 16-byte masks
    lines, result = expr_source(key.expr, n, "lin")
    numel = "aligned_stride(view_numel(views_ptr, out_v), 8)" if vec else "view_numel(views_ptr, out_v)"
    src = [
        "",
        "",
        "@gluon.jit",
        f"def {name}(row, views_ptr, ins, num_warps: gl.constexpr):",
        f"    BLOCK: gl.constexpr = {key.block}",
        "    LAYOUT: gl.constexpr = flat_layout(BLOCK, num_warps)",
        "    out_v = arg(row, ins, 0)",
        f"    first = arg(row, ins, {n + 1})",
        f"    n = {numel}",
        f"    for blk in range(first, first + arg(row, ins, {n + 2})):  # the tile's blocks",
        "        lin = blk * BLOCK + gl.arange(0, BLOCK, layout=LAYOUT)",
        "        mask = lin < n",
    ]
    body = []
    if shape is not None:  # once for every strided view: they share the shape
        body.append(f"i0, i1, i2, i3 = split_index(lin, {shape[1]}, {shape[2]}, {shape[3]})")
    body += input_loads(key.expr, key.in_dtypes, flat[1:], lambda k: f"arg(row, ins, {k + 1})", shape is not None)
    body += lines
    out = tl_dtype(key.out_dtype)
    if flat[0] == 0 and shape is not None:
        body.append(f"store_strided(addrs_ptr, views_ptr, out_v, i0, i1, i2, i3, mask, {result}, {out})")
    else:
        body.append(f"store_view(addrs_ptr, views_ptr, out_v, lin, mask, {result}, {out}, {flat[0]})")
    src += [f"        {gluon_line(line)}" for line in body]
    return "\n".join(src) + "\n"


def _emit_elementwise(key, opcode: int, queue: Queue) -> Emitted:
    name = f"op{opcode}_elementwise"
    return Emitted(elementwise_routine(key, name), guarded(f"{name}(row, views_ptr, idx, num_warps)"))


register(ELEMENTWISE, GluonFamily(lambda key: expr_problem(key.expr), _emit_elementwise, VIEWS_MODULE, VIEW_HELPERS))
