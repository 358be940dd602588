"""Bad inputs at call time: an InputError (a ValueError; InputTypeError, also a TypeError, for what is
not a tensor or not structured like the example inputs) that
names the argument (position and the forward's parameter name), what was expected and what
was given; and nothing happens: no launch, no binding, counters and model state (a KV cache)
exactly as they were. The next good call then computes the right answer.
"""

import re

import pytest
import torch
from helpers import TOL, reference, rel_err

import mkcompiler
from mkcompiler import InputError
from mkcompiler.errors import InputTypeError

OPTIONS = dict(matmul_tile=(16, 16, 16), elementwise_block=32)


class TwoInputs(torch.nn.Module):
    """Distinctive parameter names, so messages can be checked for them."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, hidden, residual):
        return residual + torch.relu(self.proj(hidden))


class KVCache(torch.nn.Module):
    """Model state updated in place: a refused call must leave it untouched."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.randn(4, 8))
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, token, pos):
        self.cache.index_copy_(0, pos, self.proj(token))
        return self.cache.sum(-1)


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = TwoInputs()
    mk = mkcompiler.compile(model, (torch.randn(3, 16), torch.randn(3, 16)), **OPTIONS)
    return model, mk


def snapshot(mk) -> dict:
    """Everything a call could change before or by launching."""
    return dict(
        generation=mk.generation,
        counters=mk.counters.clone(),
        head=mk.head.clone(),
        err=mk.err.clone(),
        addrs=mk.addrs.clone(),
        bound={k: v.data_ptr() for k, v in mk._bound.items()},
        buffers={k: v.clone() for k, v in mk.buffers.items()},
        state={k: v.clone() for k, v in mk.graph.params.items()},
    )


def assert_unchanged(mk, before: dict) -> None:
    after = snapshot(mk)
    assert after["generation"] == before["generation"]
    assert after["bound"] == before["bound"]
    for key in ("counters", "head", "err", "addrs"):
        assert torch.equal(after[key], before[key]), key
    for key in ("buffers", "state"):  # buffers hold NaN (poisoned): NaN must stay NaN
        for k in before[key]:
            torch.testing.assert_close(after[key][k], before[key][k], rtol=0, atol=0, equal_nan=True, msg=f"{key} {k}")


class NoLaunch:
    """Replaces the kernel: any launch during a refused call fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for a refused call")


def refused(mk, error: type, *args) -> str:
    """Call with bad args; check the error type, that nothing launched and nothing changed."""
    mk.poison()
    before = snapshot(mk)
    kernel, mk._kernel = mk._kernel, NoLaunch()
    try:
        with pytest.raises(error) as info:
            mk(*args)
    finally:
        mk._kernel = kernel
    assert_unchanged(mk, before)
    return str(info.value)


def assert_good_call(mk, model, *inputs) -> None:
    mk.poison()
    assert rel_err(mk(*inputs), reference(model, inputs)) <= TOL[torch.float32]


def x() -> torch.Tensor:
    return torch.randn(3, 16)


# (bad call, error type, the facts its message must state: argument, expected, got)
CASES = {
    "not_a_tensor": (
        lambda: (x(), 2.5),
        InputTypeError,
        ["input 1 ('residual')", "torch.Tensor", "(3, 16)", "got float 2.5"],
    ),
    "numpy_array": (
        lambda: (x().numpy(), x()),
        InputTypeError,
        ["input 0 ('hidden')", "torch.Tensor", "got numpy.ndarray of shape (3, 16) and dtype float32"],
    ),
    "python_list": (
        lambda: (x().tolist(), x()),
        InputTypeError,
        ["input 0 ('hidden')", "torch.Tensor", "(3, 16)", "got list of 3 items"],
    ),
    "tensor_in_a_list": (lambda: ([x()], x()), InputTypeError, ["input 0 ('hidden')", "got list of 1 item"]),
    "rank": (
        lambda: (x(), x()[None]),
        InputError,
        ["input 1 ('residual')", "expected rank 2", "got rank 3 (shape (1, 3, 16))"],
    ),
    "shape": (
        lambda: (torch.randn(4, 16), x()),
        InputError,
        ["input 0 ('hidden')", "expected shape (3, 16)", "got (4, 16)"],
    ),
    "dtype": (
        lambda: (x(), x().bfloat16()),
        InputError,
        ["input 1 ('residual')", "expected dtype torch.float32", "got torch.bfloat16"],
    ),
    "device": (
        lambda: (torch.empty(3, 16, device="meta"), x()),
        InputError,
        ["input 0 ('hidden')", "on cpu", "got one on meta"],
    ),
    "non_contiguous": (
        lambda: (x(), torch.randn(16, 3).t()),
        InputError,
        ["input 1 ('residual')", "contiguous", "strides (1, 3)"],
    ),
    "expanded": (
        lambda: (torch.randn(1, 16).expand(3, 16), x()),
        InputError,
        ["input 0 ('hidden')", "contiguous", "strides (0, 1)"],
    ),
    "too_few": (lambda: (x(),), InputError, ["expected 2 tensor inputs (hidden, residual)", "got 1"]),
    "too_many": (lambda: (x(), x(), x()), InputError, ["expected 2 tensor inputs", "got 3"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_launch(compiled, case):
    model, mk = compiled
    make_args, error, facts = CASES[case]
    assert_good_call(mk, model, x(), x())  # something is bound and counters are nonzero
    message = refused(mk, error, *make_args())
    for fact in facts:
        assert fact in message, (fact, message)
    assert_good_call(mk, model, x(), x())


def test_input_errors_are_value_errors():
    assert issubclass(InputError, ValueError)
    assert issubclass(InputTypeError, InputError) and issubclass(InputTypeError, TypeError)


def test_keyword_inputs_the_example_did_not_have_are_refused(compiled):
    model, mk = compiled
    assert_good_call(mk, model, x(), x())
    mk.poison()
    before = snapshot(mk)
    with pytest.raises(InputError, match="keyword arguments: expected keys \\[\\], got \\['extra'\\]"):
        mk(x(), x(), extra=x())
    assert_unchanged(mk, before)


def test_the_same_tensor_twice_is_refused(compiled):
    model, mk = compiled
    a = x()
    message = refused(mk, InputError, a, a)
    assert "input 1 ('residual') overlaps input 0 ('hidden')" in message and "share memory" in message


def test_partly_overlapping_views_are_refused(compiled):
    model, mk = compiled
    rows = torch.randn(5, 16)
    message = refused(mk, InputError, rows[:3], rows[2:])  # row 2 is in both
    assert "input 1 ('residual') overlaps input 0 ('hidden')" in message
    got = re.findall(r"\[0x[0-9a-f]+, 0x[0-9a-f]+\)", message)
    assert len(got) == 2, message


def test_disjoint_views_of_one_storage_are_accepted(compiled):
    """The check is on bytes, not storages: side-by-side halves of one tensor are fine."""
    model, mk = compiled
    rows = torch.randn(6, 16)
    assert_good_call(mk, model, rows[:3], rows[3:])


def test_an_output_view_fed_back_is_refused():
    """With copy_outputs=False an output is the megakernel's own buffer, which the next launch
    overwrites while reading the input: refused, named as the kernel's buffer."""
    torch.manual_seed(0)
    model = TwoInputs()
    mk = mkcompiler.compile(model, (x(), x()), copy_outputs=False, **OPTIONS)
    out = mk(x(), x())
    fed_back = out.clone()
    message = refused(mk, InputError, out, x())
    assert "input 0 ('hidden') overlaps the megakernel's buffer" in message and "copy_outputs=False" in message
    assert_good_call(mk, model, fed_back, x())


@pytest.fixture(scope="module")
def kv():
    torch.manual_seed(1)
    model = KVCache()
    mk = mkcompiler.compile(model, (torch.randn(1, 8), torch.tensor([0])), **OPTIONS)
    return model, mk


KV_CASES = {
    "position_dtype": (
        lambda m: (torch.randn(1, 8), torch.tensor([1], dtype=torch.int32)),
        ["input 1 ('pos')", "expected dtype torch.int64", "got torch.int32"],
    ),
    "token_shape": (
        lambda m: (torch.randn(2, 8), torch.tensor([1])),
        ["input 0 ('token')", "expected shape (1, 8)", "got (2, 8)"],
    ),
    "token_in_the_cache": (
        lambda m: (m.cache[1:2], torch.tensor([1])),
        ["input 0 ('token') overlaps the megakernel's buffer 'cache (model state)'"],
    ),
}


@pytest.mark.parametrize("case", list(KV_CASES))
def test_refused_call_leaves_model_state_alone(kv, case):
    model, mk = kv
    make_args, facts = KV_CASES[case]
    cache = model.cache.clone()
    message = refused(mk, InputError, *make_args(model))
    for fact in facts:
        assert fact in message, (fact, message)
    assert torch.equal(model.cache, cache)
    # A good call then updates the state exactly as eager does.
    token, pos = torch.randn(1, 8), torch.tensor([3])
    expected_cache = cache.clone()
    expected_cache[3] = model.proj(token)[0].detach()
    out = mk(token, pos)
    assert rel_err(model.cache, expected_cache) <= TOL[torch.float32]
    assert rel_err(out, expected_cache.sum(-1)) <= TOL[torch.float32]


@pytest.mark.gpu
def test_gpu_megakernel_refuses_host_and_strided_inputs():
    torch.manual_seed(0)
    model = TwoInputs().cuda()
    a, b = torch.randn(3, 16, device="cuda"), torch.randn(3, 16, device="cuda")
    mk = mkcompiler.compile(model, (a, b))
    assert rel_err(mk(a, b), reference(model, (a, b))) <= TOL[torch.float32]
    message = refused(mk, InputError, a, b.cpu())
    assert "input 1 ('residual'): expected a tensor on cuda:0, got one on cpu" in message
    message = refused(mk, InputError, torch.randn(16, 3, device="cuda").t(), b)
    assert "input 0 ('hidden'): expected a contiguous tensor, got strides (1, 3)" in message
    assert rel_err(mk(a, b), reference(model, (a, b))) <= TOL[torch.float32]


class _PairInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, xs):
        return self.lin(xs[0]) + xs[1]


@pytest.mark.parametrize("cache", [False, True])
def test_nested_inputs_are_called_as_they_were_exported(cache, device):
    """A list argument is called as a list (the exported structure, also after a cache hit); the
    flat tensors as two positional arguments are refused."""
    torch.manual_seed(0)
    m = _PairInput().to(device)
    x, y = torch.randn(4, 16, device=device), torch.randn(4, 16, device=device)
    mk = mkcompiler.compile(m, ([x, y],), cache=cache)
    x2, y2 = torch.randn(4, 16, device=device), torch.randn(4, 16, device=device)
    assert rel_err(mk([x2, y2]), m([x2, y2])) < TOL[torch.float32]
    with pytest.raises(InputError, match="1 positional"):
        mk(x2, y2)
