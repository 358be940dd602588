"""Bad models, not only bad inputs: clear errors at compile time, naming the parameter, attribute,
module or op, for what would otherwise compile into a wrong answer (or fail obscurely): weights on
several devices, dtypes megakernels do not run (unless fallback="eager" runs them eagerly, to the
right answer), a forward that changes Python attributes, example inputs that require grad in
training mode, dropout in training mode."""

import pytest
import torch

import mkcompiler
from mkcompiler import ModelError, UnsupportedOpError

torch.manual_seed(0)


def fresh_input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-100, 100, (4, 16), dtype=dtype)
    return torch.randn(4, 16, dtype=dtype)


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 16)
        self.second = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_weights_on_different_devices():
    model = TwoLayers()
    model.second.to("meta")  # a second device on a CPU-only machine
    with pytest.raises(
        ModelError, match=r"parameter 'second\.weight' is on meta but parameter 'first\.weight' is on cpu"
    ):
        mkcompiler.compile(model, (fresh_input(),))
    model = TwoLayers()  # the inputs on another device than the weights
    with pytest.raises(ModelError, match=r"example input 0 \('x'\) is on meta but parameter 'first\.weight' is on cpu"):
        mkcompiler.compile(model, (fresh_input().to("meta"),))
    with pytest.raises(ModelError, match=r"parameter 'first\.weight' is on the meta device: it has no data"):
        mkcompiler.compile(model.to("meta"), (fresh_input().to("meta"),))


class Dequantize(torch.nn.Module):
    """A weight stored in a dtype megakernels do not load, dequantized in forward."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", (torch.randn(16, 16) * 4).round().to(dtype))
        self.scale = 0.05

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale)


class ComplexOutput(torch.nn.Module):
    """Returns a complex tensor (complex arithmetic inside compiles as real arithmetic; a complex
    value cannot leave a megakernel)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rotation", torch.polar(torch.ones(4, 8), torch.randn(4, 8)))

    def forward(self, x):
        return torch.view_as_complex(x.reshape(4, 8, 2)) * self.rotation


class Int8Input(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, codes):
        return self.fc(codes.float() / 8)


UNSUPPORTED_DTYPES = {
    "int8 weight": (lambda: Dequantize(torch.int8), torch.float32, r"torch\.int8 parameter 'qweight'"),
    "fp8 weight": (lambda: Dequantize(torch.float8_e4m3fn), torch.float32, r"torch\.float8_e4m3fn parameter 'qweight'"),
    # frontend/complex_values.py lowers complex arithmetic; without it, view_as_complex is refused
    "complex output": (ComplexOutput, torch.float32, r"a complex model output|the op aten\.view_as_complex"),
    "int8 input": (Int8Input, torch.int8, r"torch\.int8 input 'codes'"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED_DTYPES))
def test_dtypes_megakernels_do_not_run(case):
    make, input_dtype, named = UNSUPPORTED_DTYPES[case]
    model = make()
    example = fresh_input(input_dtype)
    with pytest.raises(UnsupportedOpError, match=named):
        mkcompiler.compile(model, (example,))
    with pytest.warns(UserWarning, match="eager"):
        mk = mkcompiler.compile(model, (example,), fallback="eager")
    assert mk.fallen_back
    for _ in range(2):
        x = fresh_input(input_dtype)
        torch.testing.assert_close(mk(x), model(x), rtol=1e-4, atol=1e-5)


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


class History(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(16, 16))
        self.inner.seen = []

    def forward(self, x):
        self.inner.seen.append(tuple(x.shape))
        return self.inner(x)


class LastShape(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        self.last_rows = x.shape[0]
        return self.fc(x)


@pytest.mark.parametrize(
    "make, named",
    [
        (Counter, r"attribute 'calls' of the model \(from 0 to 1\)"),
        (History, r"attribute 'seen' of submodule 'inner'"),
        (LastShape, r"attribute 'last_rows' of the model \(sets it to 4\)"),
    ],
    ids=["counter", "list append", "new attribute"],
)
def test_forward_that_changes_a_python_attribute(make, named):
    model = make()
    for cache in (True, False):  # the cache's trace runs forward too: no side effect left either way
        with pytest.raises(ModelError, match=named):
            mkcompiler.compile(model, (fresh_input(),), cache=cache)
    assert getattr(model, "calls", 0) == 0 and not hasattr(model, "last_rows")  # left as it was


def test_example_inputs_that_require_grad_in_training_mode():
    model = TwoLayers()
    x = fresh_input().requires_grad_()
    with pytest.raises(ModelError, match=r"example input 0 \('x'\) requires grad and the model is in training mode"):
        mkcompiler.compile(model, (x,))
    with torch.no_grad():  # for inference: no gradients wanted
        mk = mkcompiler.compile(model, (x,))
    y = fresh_input()
    torch.testing.assert_close(mk(y), model(y), rtol=1e-4, atol=1e-5)
    mk = mkcompiler.compile(model.eval(), (x,))
    torch.testing.assert_close(mk(y), model(y), rtol=1e-4, atol=1e-5)


class WithDropout(torch.nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(0.25)
        self.functional = functional

    def forward(self, x):
        h = self.fc(x)
        if self.functional:
            return torch.nn.functional.dropout(h, 0.25, self.training)
        return self.drop(h)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_dropout_in_training_mode(functional):
    model = WithDropout(functional)
    named = r"at .*test_bad_models\.py" if functional else r"in module 'drop'"
    for fallback in ("error", "eager"):
        with pytest.raises(
            ModelError, match=rf"training mode and applies dropout \(p=0\.25\) {named}.*model\.eval\(\)"
        ):
            mkcompiler.compile(model, (fresh_input(),), fallback=fallback)
    mk = mkcompiler.compile(model.eval(), (fresh_input(),))
    x = fresh_input()
    torch.testing.assert_close(mk(x), model(x), rtol=1e-4, atol=1e-5)
    plain = TwoLayers().train()  # training mode without dropout computes what eval mode does
    mk = mkcompiler.compile(plain, (x,))
    torch.testing.assert_close(mk(x), plain(x), rtol=1e-4, atol=1e-5)
