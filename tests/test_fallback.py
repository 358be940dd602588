"""fallback="eager": ops mkcompiler refuses run in eager PyTorch between megakernel segments.

Every model is compiled with small tiles (several tiles per op), every megakernel segment is
poisoned with NaN first, and outputs are compared with a float64 eager run on fresh inputs.
"""

import copy
import os
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import TOL, reference, rel_err
from torch import nn

import mkcompiler
from mkcompiler.runtime.fallback import FallbackWarning, SegmentedModel

OPTS = dict(matmul_tile=(16, 16, 16), elementwise_block=64, row_block=2)
HERE = os.path.basename(__file__)
MK, EAGER = "megakernel", "eager"
R, D, H = 5, 24, 40  # rows not a multiple of the tiles: masks matter


@pytest.fixture(autouse=True)
def _on_device(on_device):
    """Seeded, tensors made where kernels run (conftest.on_device)."""


class Sandwich(nn.Module):
    """Linear -> cumsum (unsupported) -> Linear."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        h = torch.relu(self.up(x))
        h = torch.cumsum(h, dim=-1)
        return self.down(h) * 0.5


class UnsupportedFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, H)

    def forward(self, x):
        return torch.sigmoid(self.proj(torch.sort(x, dim=-1).values))


class UnsupportedLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, H)

    def forward(self, x):
        return torch.cumsum(torch.tanh(self.proj(x)), dim=-1)


class TwoUnsupported(nn.Module):
    """Linear, cumsum, Linear, sort, Linear, with a residual that crosses every segment."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(D, H), nn.Linear(H, D), nn.Linear(D, D)

    def forward(self, x):
        h = torch.cumsum(self.a(x), dim=-1)
        h = torch.sort(self.b(h) + x, dim=-1).values
        return self.c(h) + x


class ViewsBetween(nn.Module):
    """Between the two unsupported ops there are only views: no megakernel is made of them."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(R, D)

    def forward(self, x):
        h = torch.cumsum(x, dim=-1).t()
        h = torch.cumsum(h.reshape(D, R), dim=0)
        return self.proj(h), h.t()


class Supported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x


class Cache(nn.Module):
    """Appends a row to a KV-cache-like buffer (in place, inside a megakernel), then reads the
    whole cache through an unsupported op."""

    def __init__(self, slots: int = 6):
        super().__init__()
        self.proj, self.out = nn.Linear(D, H), nn.Linear(H, D)
        self.register_buffer("cache", torch.zeros(slots, H))

    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, torch.relu(self.proj(x)))
        return self.out(torch.cumsum(self.cache, dim=0))


def compile_fallback(model, inputs, op: str):
    """Compile with fallback="eager", checking the warning names `op` and its line in this file."""
    with pytest.warns(FallbackWarning, match=op) as record:
        mk = mkcompiler.compile(model, inputs, fallback="eager", **OPTS)
    message = str(record[0].message)
    assert HERE in message, message
    assert isinstance(mk, SegmentedModel), mk
    return mk


def check(mk, model, inputs):
    """Poison every megakernel segment, run on `inputs`, compare with float64 eager."""
    mk.poison()
    out, ref = mk(*inputs), reference(model, inputs)
    for o, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)):
        assert o.shape == r.shape, (o.shape, r.shape)
        err = rel_err(o, r)
        assert err <= TOL[torch.float32], f"relative error {err:.3g}"
    return out


def kinds(mk) -> list[str]:
    return [kind for kind, _ in mk.segments]


def test_without_fallback_the_error_names_op_and_source():
    with pytest.raises(mkcompiler.UnsupportedOpError) as info:
        mkcompiler.compile(Sandwich(), (torch.randn(R, D),), **OPTS)
    message = str(info.value)
    assert "cumsum" in message and HERE in message, message
    assert "supported ATen ops" in message, message


def test_fallback_runs_unsupported_op_between_megakernels():
    model = Sandwich()
    mk = compile_fallback(model, (torch.randn(R, D),), "cumsum")
    assert kinds(mk) == [MK, EAGER, MK], mk.segments
    assert mk.fallen_back[0][0] == "aten.cumsum.default" and HERE in mk.fallen_back[0][1], mk.fallen_back
    assert "megakernel" in mk.source and mk.queue is mk.megakernels[0].queue
    for _ in range(2):  # fresh inputs each call
        check(mk, model, (torch.randn(R, D),))


@pytest.mark.parametrize(
    "model_cls, op, expected",
    [(UnsupportedFirst, "sort", [EAGER, MK]), (UnsupportedLast, "cumsum", [MK, EAGER])],
    ids=["first", "last"],
)
def test_unsupported_op_at_either_end(model_cls, op, expected):
    model = model_cls()
    mk = compile_fallback(model, (torch.randn(R, D),), op)
    assert kinds(mk) == expected, mk.segments
    check(mk, model, (torch.randn(R, D),))


def test_two_unsupported_ops_alternate_segments():
    model = TwoUnsupported()
    with pytest.warns(FallbackWarning) as record:
        mk = mkcompiler.compile(model, (torch.randn(R, D),), fallback="eager", **OPTS)
    message = str(record[0].message)
    assert "cumsum" in message and "sort" in message, message
    assert kinds(mk) == [MK, EAGER, MK, EAGER, MK], mk.segments
    check(mk, model, (torch.randn(R, D),))


def test_views_between_unsupported_ops_stay_eager():
    model = ViewsBetween()
    mk = compile_fallback(model, (torch.randn(R, D),), "cumsum")
    assert kinds(mk) == [EAGER, MK, EAGER], mk.segments  # the last one makes the returned view
    check(mk, model, (torch.randn(R, D),))


def test_refused_use_of_a_supported_op_falls_back_with_the_reason():
    model = nn.Sequential(nn.Linear(D, H), Lambda(lambda h: h - h.sum(0)), nn.Linear(H, D))
    mk = compile_fallback(model, (torch.randn(R, D),), "last dim")
    assert kinds(mk) == [MK, EAGER, MK], mk.segments
    check(mk, model, (torch.randn(R, D),))


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_all_supported_model_is_one_megakernel_without_warning():
    model = Supported()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        mk = mkcompiler.compile(model, (torch.randn(R, D),), fallback="eager", **OPTS)
    assert isinstance(mk, mkcompiler.Megakernel), mk
    check(mk, model, (torch.randn(R, D),))


def test_all_eager_model_has_no_megakernel_source():
    model = Lambda(lambda x: torch.cumsum(x, dim=0).t())
    mk = compile_fallback(model, (torch.randn(R, D),), "cumsum")
    assert kinds(mk) == [EAGER]  # the returned view is made in the same (eager) segment
    with pytest.raises(AttributeError, match="no megakernel segment"):
        mk.source  # noqa: B018
    x = torch.randn(R, D)
    torch.testing.assert_close(mk(x), torch.cumsum(x, dim=0).t())


def test_model_state_is_updated_in_place_across_segments():
    model = Cache()
    eager = copy.deepcopy(model)
    mk = compile_fallback(model, (torch.randn(1, D), torch.tensor([0])), "cumsum")
    assert kinds(mk) == [MK, EAGER, MK], mk.segments
    state = mk.megakernels[0].graph.buffers
    assert any(b.name == "cache" and b.kind.value == "state" for b in state), state
    mk.poison()
    for step in range(3):
        x, pos = torch.randn(1, D), torch.tensor([step])
        out, ref = mk(x, pos), eager(x, pos)
        assert rel_err(model.cache, eager.cache) <= TOL[torch.float32]
        assert rel_err(out, ref) <= TOL[torch.float32], step


class ReadBeforeWrite(Cache):
    """An eager op reads the cache's old value; the megakernel computes the new one: the write
    must wait for the eager read (it lands in the eager segment, after it)."""

    def forward(self, x, pos):
        old = torch.cumsum(self.cache, dim=0)
        self.cache.index_copy_(0, pos, torch.relu(self.proj(x)))
        return self.out(old) + self.cache.sum()


def test_state_read_by_an_eager_op_is_written_after_it():
    model = ReadBeforeWrite()
    model.cache.normal_()
    eager = copy.deepcopy(model)
    mk = compile_fallback(model, (torch.randn(1, D), torch.tensor([0])), "cumsum")
    mk.poison()
    for step in range(2):
        x, pos = torch.randn(1, D), torch.tensor([step])
        out, ref = mk(x, pos), eager(x, pos)
        assert rel_err(model.cache, eager.cache) <= TOL[torch.float32], step
        assert rel_err(out, ref) <= TOL[torch.float32], step


class UnalignedCache(Cache):
    """State a megakernel cannot update in place (not 16-byte aligned): only capture sees that,
    when the segment writing it compiles; that segment then runs eagerly."""

    def __init__(self):
        super().__init__()
        self.cache = torch.zeros(6 * H + 1)[1:].view(6, H)


def test_segment_capture_refuses_runs_eagerly():
    model = UnalignedCache()
    eager = copy.deepcopy(model)
    mk = compile_fallback(model, (torch.randn(1, D), torch.tensor([0])), "16-byte aligned")
    assert kinds(mk) == [EAGER, MK], mk.segments
    x, pos = torch.randn(1, D), torch.tensor([2])
    mk.poison()
    assert rel_err(mk(x, pos), eager(x, pos)) <= TOL[torch.float32]
    assert torch.equal(model.cache, eager.cache)


def test_bad_input_is_refused_before_anything_runs():
    model = Cache()
    mk = compile_fallback(model, (torch.randn(1, D), torch.tensor([0])), "cumsum")
    before = model.cache.clone()
    with pytest.raises(mkcompiler.InputError, match=r"input 0 \('x'\): expected shape \(1, 24\), got \(2, 24\)"):
        mk(torch.randn(2, D), torch.tensor([1]))
    assert torch.equal(model.cache, before)


def test_fallback_option_is_checked():
    with pytest.raises(ValueError, match="fallback must be 'error' or 'eager', not 'skip'"):
        mkcompiler.compile(Supported(), (torch.randn(R, D),), fallback="skip")
