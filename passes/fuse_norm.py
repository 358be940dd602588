"""Fold a row normalisation into the matmuls that read its output, when they have few rows.

A norm op N (LayerNorm or RMSNorm over the last dim: h = norm(x) * g (+ b), ops/norm.py) whose
output h is read only by matmuls, each as its whole A operand ([R, C] rows of h), is folded
into every one of them: the matmul tile computes h's rows from x itself (ops/matmul.py), N then
has no reader and is dropped: in decode, one stage (and one wait) less per norm. Only for
matmuls of at most MAX_ROWS rows: each tile redoes its rows' statistics, free next to streaming
the weights in decode, wasteful in prefill where every column tile would redo them.

How the tile does it (Matmul.norm_in_loop decides, per matmul):
- It sees all of K (the matmul is not split, passes/split_k.py): one pass.
  The K loop sums each row's x^2 (and x, LayerNorm) from the A blocks it loads anyway and feeds
  the dot x * g; the rows of acc are normalised once at the end: C = rstd * (x*g) W for RMSNorm,
  C = rstd * ((x*g) W - mean * gW) + bW for LayerNorm (gW = sum_k g_k W_kn and bW = sum_k b_k W_kn
  come out of the same dot, from spare rows of the A block carrying g and b: LayerNorm, or a
  bias, needs M + 1 (+ 1) <= BM). No sweep over K ahead of the weights, so the tile costs about
  what an unfolded one does. Rounding: the dot's A is x * g rounded to h's dtype, not h itself,
  so results differ from the unfolded graph by bf16 rounding (within its tolerance, not bitwise).
  LayerNorm rounds x * g before centring it and takes the variance as E[x^2] - mean^2, which
  lose precision as a row's |mean| grows against its spread; it works on x - x[row, 0] instead,
  so only as far as a row's first element lies from its mean.
- It sees one K chunk (split-K): it sweeps its rows over all of K first (software-pipelined),
  then normalises each A block as it loads it and rounds it to h's dtype as N would have stored
  h (the same h as the unfolded graph, up to the order in which the statistics are summed).
"""

from __future__ import annotations

from mkcompiler.ops.matmul import FoldedNorm, MatmulInputs

from mkcompiler.ir.graph import Graph, View

MAX_ROWS = 16


def _as_rows(v: View, c: int) -> View | None:
    return v.reshape((v.numel // c, c)) if v.numel % c == 0 else None


def fuse_norm_into_matmul(graph: Graph) -> Graph:
    outputs, readers = graph.output_buffers(), graph.readers()
    dropped = set()
    for norm in graph.ops:
        if norm.kind != "norm":
            continue
        h = norm.outputs[0]
        x, w, b = norm.inputs
        c = x.shape[-1]
        users = readers.get(h.buffer, [])
        if not users or h.buffer in outputs or h.offset != 0 or not h.is_contiguous():
            continue
        rows = _as_rows(h, c)
        if not all(_reads_rows_as_a(op, h, rows) for op in users):
            continue
        x2 = _as_rows(x, c)
        if x2 is None or any(op.inputs[0].shape[0] > MAX_ROWS for op in users):
            continue
        for op in users:
            a, bmat, bias = op.inputs
            op.inputs = tuple(MatmulInputs(x2, bmat, bias, norm_weight=w, norm_bias=b))
            op.attrs.norm = FoldedNorm(norm.attrs.rms, norm.attrs.eps, h.dtype, norm.name)
        dropped.add(id(norm))
    graph.ops = [op for op in graph.ops if id(op) not in dropped]
    return graph


def _reads_rows_as_a(op, h: View, rows: View | None) -> bool:
    """op is a matmul whose A operand is all of h, read as [R, C] rows, and nothing else of it."""
    if op.kind != "matmul" or rows is None or len(op.inputs) != 3 or op.attrs.norm is not None:
        return False
    a, bmat, bias = op.inputs
    others = [v for v in (bmat, bias) if v is not None]
    return a == rows and all(v.buffer != h.buffer for v in others)
