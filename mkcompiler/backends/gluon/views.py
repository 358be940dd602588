"""Gluon twins of ops/common.py's view helpers: element offsets of strided views, loads and stores
through the view table. The generated elementwise and scatter routines (elementwise.py,
small_ops.py) call them with the SAME arguments as the Triton routines call ops/common.py's,
less the address table: both read a view's base address from its row's ADDR column (the Triton
helpers take `addrs_ptr` and ignore it), so one generated line serves either backend once
`addrs_ptr, ` is dropped (elementwise.gluon_line).

Every tensor argument carries its layout already (the routines' aranges give it); scalars need
none. Loads go through L2 (.cg): what they read was written by another SM after the wait.

Importing this module does no CUDA work and never fails without Gluon (tiles.HAVE_GLUON).
"""

from __future__ import annotations

from mkcompiler.backends.gluon.tiles import HAVE_GLUON
from mkcompiler.ir.layout import MAX_RANK, ViewField

assert MAX_RANK == 4, "the helpers below unroll exactly four dims"

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    # view_size / view_stride re-exported: the generated routines take every view helper from here
    from mkcompiler.backends.gluon.tiles import view_base, view_field, view_size, view_stride  # noqa: F401

    _V_ADDR = gl.constexpr(int(ViewField.ADDR))

    # ---- layouts (compile-time functions of the tile's constants and the partition's warps) ----

    @gluon.constexpr_function
    def flat_layout(block, num_warps):
        """1-D over `block` elements: up to 8 contiguous elements per thread (16-byte accesses),
        replicated where the block is smaller than the warps."""
        vec = max(1, min(8, block // (32 * num_warps)))
        return gl.BlockedLayout([vec], [32], [num_warps], [0])

    @gluon.constexpr_function
    def rows_layout(bc, num_warps):
        """2-D [rows, bc columns] (row ops: a row per tile row, swept bc columns at a time): up to
        8 contiguous columns per thread, a warp's threads along the columns first, the warps along
        the columns while they fill them, the rest along the rows (num_warps a power of 2)."""
        vec = max(1, min(8, bc // 32))
        tpw_c = min(32, max(1, bc // vec))
        wc = max(1, min(num_warps, bc // (vec * tpw_c)))
        return gl.BlockedLayout([1, vec], [32 // tpw_c, tpw_c], [num_warps // wc, wc], [1, 0])

    # ---- offsets, loads and stores ----

    @gluon.jit
    def view_base_aligned(views_ptr, v, DTYPE: gl.constexpr):
        """view_base of a view known (from the op's key) to start 16-byte aligned; the hint is on
        the cast itself (a hint on a value returned from a call is lost when it is inlined)."""
        addr = view_field(views_ptr, v, _V_ADDR)
        return gl.multiple_of(addr.to(gl.pointer_type(DTYPE), bitcast=True), 16)

    @gluon.jit
    def aligned_stride(stride, VEC: gl.constexpr):
        """A value known (from the op's key) to be a multiple of VEC, written so that the
        divisibility analysis sees it: masks then stay uniform across 16-byte vectors."""
        return (stride // VEC) * VEC

    @gluon.jit
    def split_index(lin, S1: gl.constexpr, S2: gl.constexpr, S3: gl.constexpr):
        """Row-major (i0, i1, i2, i3) of int32 linear indices over a shape known at compile time
        (divisions by constants: multiply and shift)."""
        lin = lin.to(gl.int32)
        i3 = lin % S3
        t = lin // S3
        i2 = t % S2
        t = t // S2
        return t // S1, t % S1, i2, i3

    @gluon.jit
    def strided_offsets(views_ptr, v, i0, i1, i2, i3):
        """Element offsets (int64) of view v at index (i0, i1, i2, i3)."""
        return (
            i0.to(gl.int64) * view_stride(views_ptr, v, 0)
            + i1.to(gl.int64) * view_stride(views_ptr, v, 1)
            + i2.to(gl.int64) * view_stride(views_ptr, v, 2)
            + i3.to(gl.int64) * view_stride(views_ptr, v, 3)
        )

    @gluon.jit
    def view_offsets(views_ptr, v, lin):
        """Element offsets of row-major linear indices `lin` over view v's own (runtime) shape; the
        split in int32 (int64 division is a long software sequence)."""
        lin = lin.to(gl.int32)
        s1 = view_size(views_ptr, v, 1).to(gl.int32)
        s2 = view_size(views_ptr, v, 2).to(gl.int32)
        s3 = view_size(views_ptr, v, 3).to(gl.int32)
        i3 = lin % s3
        t = lin // s3
        i2 = t % s2
        t = t // s2
        return strided_offsets(views_ptr, v, t // s1, t % s1, i2, i3)

    @gluon.jit
    def offsets_of(views_ptr, v, lin, FLAT: gl.constexpr):
        """view_offsets, or `lin` itself for a view known to be contiguous (FLAT >= 1,
        ops/base.flat_flags): unit stride, so accesses coalesce."""
        if FLAT >= 1:
            offs = lin.to(gl.int64)
        else:
            offs = view_offsets(views_ptr, v, lin)
        return offs

    @gluon.jit
    def _typed_base(views_ptr, v, DTYPE: gl.constexpr, FLAT: gl.constexpr):
        if FLAT == 2:
            p = view_base_aligned(views_ptr, v, DTYPE)  # lets the compiler issue 16-byte accesses
        else:
            p = view_base(views_ptr, v, DTYPE)
        return p

    @gluon.jit
    def load_view(views_ptr, v, lin, mask, DTYPE: gl.constexpr, FLAT: gl.constexpr):
        """Elements `lin` of view v as fp32 (masked lanes read 0)."""
        p = _typed_base(views_ptr, v, DTYPE, FLAT) + offsets_of(views_ptr, v, lin, FLAT)
        return gl.load(p, mask=mask, other=0.0, cache_modifier=".cg").to(gl.float32)

    @gluon.jit
    def store_view(views_ptr, v, lin, mask, value, DTYPE: gl.constexpr, FLAT: gl.constexpr):
        p = _typed_base(views_ptr, v, DTYPE, FLAT) + offsets_of(views_ptr, v, lin, FLAT)
        gl.store(p, value.to(DTYPE), mask=mask)

    @gluon.jit
    def load_strided(views_ptr, v, i0, i1, i2, i3, mask, DTYPE: gl.constexpr):
        """Elements of view v at split indices (split_index) as fp32; masked lanes read 0."""
        p = view_base(views_ptr, v, DTYPE) + strided_offsets(views_ptr, v, i0, i1, i2, i3)
        return gl.load(p, mask=mask, other=0.0, cache_modifier=".cg").to(gl.float32)

    @gluon.jit
    def store_strided(views_ptr, v, i0, i1, i2, i3, mask, value, DTYPE: gl.constexpr):
        p = view_base(views_ptr, v, DTYPE) + strided_offsets(views_ptr, v, i0, i1, i2, i3)
        gl.store(p, value.to(DTYPE), mask=mask)


# What the generated elementwise and scatter routines import from this module.
VIEW_HELPERS = (
    "aligned_stride",
    "flat_layout",
    "load_strided",
    "load_view",
    "split_index",
    "store_strided",
    "store_view",
    "strided_offsets",
    "view_size",
    "view_stride",
)
