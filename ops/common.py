"""Triton helpers every tile routine shares: reading instruction args and strided views.

A view id names a row of the view table (layout.ViewField); its buffer's base address
comes from the address table, so one routine serves every layer's tensors.
"""

import triton
import triton.language as tl

from mkcompiler.ir.layout import MAX_RANK, NUM_VIEW_FIELDS, Field, ViewField
from mkcompiler.ir.layout import PRELOADED_ARGS as LAYOUT_PRELOADED_ARGS

ARG0: tl.constexpr = tl.constexpr(int(Field.ARG0))
PRELOADED_ARGS: tl.constexpr = tl.constexpr(LAYOUT_PRELOADED_ARGS)
VIEW_ROW: tl.constexpr = tl.constexpr(NUM_VIEW_FIELDS)
V_BUFFER: tl.constexpr = tl.constexpr(int(ViewField.BUFFER))
V_OFFSET: tl.constexpr = tl.constexpr(int(ViewField.OFFSET))
V_SIZE0: tl.constexpr = tl.constexpr(int(ViewField.SIZE0))
V_STRIDE0: tl.constexpr = tl.constexpr(int(ViewField.STRIDE0))
V_ADDR: tl.constexpr = tl.constexpr(int(ViewField.ADDR))
assert MAX_RANK == 4, "view_offsets below unrolls exactly four dims"


@triton.jit
def arg(row, i: tl.constexpr):
    """Instruction argument i (int32) of `row`, the dispatcher's (row pointer, preloaded args)
    (kernel_lib.preload): a register for the first PRELOADED_ARGS, else a load."""
    if i < PRELOADED_ARGS:
        value = row[1][i]
    else:
        value = tl.load(row[0] + ARG0 + i)
    return value


@triton.jit
def view_field(views_ptr, v, f: tl.constexpr):
    """Field f (layout.ViewField) of view v's row. (Read through ld.global.nc, with the rows asked
    into L1 before the wait, it was slower: 1.646 against 1.571 ms, 1B decode, H100.)"""
    return tl.load(views_ptr + v.to(tl.int64) * VIEW_ROW + f)


@triton.jit
def view_base(addrs_ptr, views_ptr, v, DTYPE: tl.constexpr):
    """Typed pointer to element 0 of view v: its row's ADDR (layout.ViewField), one load."""
    return view_field(views_ptr, v, V_ADDR).to(tl.pointer_type(DTYPE), bitcast=True)


@triton.jit
def view_base_aligned(addrs_ptr, views_ptr, v, DTYPE: tl.constexpr):
    """view_base for a view known (from the op's key) to start 16-byte aligned. The hint must be
    applied here, on the cast: a hint on a value returned from a call is lost when it is inlined."""
    addr = view_field(views_ptr, v, V_ADDR)
    return tl.multiple_of(addr.to(tl.pointer_type(DTYPE), bitcast=True), 16)


@triton.jit
def view_size(views_ptr, v, d: tl.constexpr):
    return view_field(views_ptr, v, V_SIZE0 + d)


@triton.jit
def view_stride(views_ptr, v, d: tl.constexpr):
    return view_field(views_ptr, v, V_STRIDE0 + d)


@triton.jit
def view_numel(views_ptr, v):
    return (
        view_size(views_ptr, v, 0)
        * view_size(views_ptr, v, 1)
        * view_size(views_ptr, v, 2)
        * view_size(views_ptr, v, 3)
    )


@triton.jit
def view_offsets(views_ptr, v, lin):
    """Element offsets (int64, relative to view_base) of row-major linear indices `lin`.
    Linear indices are int32 (tile starts and aranges are), so the index split is done in
    int32: int64 division is a long software sequence on the GPU; only the products with the
    strides need 64 bits."""
    lin = lin.to(tl.int32)
    s1 = view_size(views_ptr, v, 1).to(tl.int32)
    s2 = view_size(views_ptr, v, 2).to(tl.int32)
    s3 = view_size(views_ptr, v, 3).to(tl.int32)
    i3 = lin % s3
    t = lin // s3
    i2 = t % s2
    t = t // s2
    return strided_offsets(views_ptr, v, t // s1, t % s1, i2, i3)


@triton.jit
def offsets_of(views_ptr, v, lin, FLAT: tl.constexpr):
    """view_offsets, or `lin` itself when the view is known (at compile time) to be contiguous
    (FLAT >= 1, see base.flat_flags): then Triton sees unit stride and coalesces accesses."""
    if FLAT >= 1:
        offs = lin.to(tl.int64)
    else:
        offs = view_offsets(views_ptr, v, lin)
    return offs


@triton.jit
def load_view(addrs_ptr, views_ptr, v, lin, mask, DTYPE: tl.constexpr, FLAT: tl.constexpr):
    """Elements `lin` of view v as fp32 (masked lanes read 0)."""
    if FLAT == 2:
        p = view_base_aligned(addrs_ptr, views_ptr, v, DTYPE)  # lets Triton issue 16-byte loads
    else:
        p = view_base(addrs_ptr, views_ptr, v, DTYPE)
    return tl.load(p + offsets_of(views_ptr, v, lin, FLAT), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_view_through(table_ptr, views_ptr, v, lin, mask, DTYPE: tl.constexpr, FLAT: tl.constexpr):
    """load_view of view v in the copy of its buffer whose address is in `table_ptr` (indexed by
    buffer id; e.g. a peer rank's address table): through BUFFER and OFFSET, not the row's ADDR,
    which is this rank's."""
    vrow = views_ptr + v.to(tl.int64) * VIEW_ROW
    p = tl.load(table_ptr + tl.load(vrow + V_BUFFER)).to(tl.pointer_type(DTYPE), bitcast=True) + tl.load(
        vrow + V_OFFSET
    )
    return tl.load(p + offsets_of(views_ptr, v, lin, FLAT), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_view(addrs_ptr, views_ptr, v, lin, mask, value, DTYPE: tl.constexpr, FLAT: tl.constexpr):
    if FLAT == 2:
        p = view_base_aligned(addrs_ptr, views_ptr, v, DTYPE)
    else:
        p = view_base(addrs_ptr, views_ptr, v, DTYPE)
    tl.store(p + offsets_of(views_ptr, v, lin, FLAT), value.to(DTYPE), mask=mask)


@triton.jit
def aligned_stride(stride, VEC: tl.constexpr):
    """A stride known (from the op's key) to be a multiple of VEC elements, written so that
    Triton's divisibility analysis can see it: this is what enables 16-byte loads."""
    return (stride // VEC) * VEC


@triton.jit
def split_index(lin, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr):
    """Row-major (i0, i1, i2, i3) of int32 linear indices over a shape known at compile time:
    division by constants compiles to multiply and shift, where a runtime divisor costs a long
    integer-division sequence per element (tens of instructions)."""
    lin = lin.to(tl.int32)
    i3 = lin % S3
    t = lin // S3
    i2 = t % S2
    t = t // S2
    return t // S1, t % S1, i2, i3


@triton.jit
def strided_offsets(views_ptr, v, i0, i1, i2, i3):
    """Element offsets (int64) of view v at index (i0, i1, i2, i3)."""
    return (
        i0.to(tl.int64) * view_stride(views_ptr, v, 0)
        + i1.to(tl.int64) * view_stride(views_ptr, v, 1)
        + i2.to(tl.int64) * view_stride(views_ptr, v, 2)
        + i3.to(tl.int64) * view_stride(views_ptr, v, 3)
    )


@triton.jit
def load_strided(addrs_ptr, views_ptr, v, i0, i1, i2, i3, mask, DTYPE: tl.constexpr):
    """Elements of view v at split indices (split_index) as fp32; masked lanes read 0."""
    p = view_base(addrs_ptr, views_ptr, v, DTYPE) + strided_offsets(views_ptr, v, i0, i1, i2, i3)
    return tl.load(p, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_strided(addrs_ptr, views_ptr, v, i0, i1, i2, i3, mask, value, DTYPE: tl.constexpr):
    p = view_base(addrs_ptr, views_ptr, v, DTYPE) + strided_offsets(views_ptr, v, i0, i1, i2, i3)
    tl.store(p, value.to(DTYPE), mask=mask)
