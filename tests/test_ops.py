"""Each supported op compiled alone and compared with eager, in fp32 and bf16.

Small tiles (OPTS) give every op several tiles, and shapes that are not multiples of the
tiles (5 rows, 40 columns) exercise the masks. compile_and_check poisons every intermediate
with NaN first, so a tile that is never written shows up as a failure.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, compile_and_check, rel_err
from torch import nn

import mkcompiler

OPTS = dict(matmul_tile=(16, 16, 16), elementwise_block=64, row_block=2)
DTYPES = [torch.float32, torch.bfloat16]
R, C = 5, 40  # not multiples of the tiles: masks matter
B, S, H = 2, 3, 24
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


class Fn(nn.Module):
    """A module whose forward is `fn` (a lambda in this file, so errors can point here)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype)


def positive(*shape, dtype):
    """Random values bounded away from 0 (for sqrt, rsqrt, div, fractional pow)."""
    return (torch.rand(*shape) + 0.5).to(dtype)


def check(fn, inputs, dtype, tol=None):
    return compile_and_check(Fn(fn), inputs, dtype, tol=tol, **OPTS)


@pytest.fixture(autouse=True)
def _on_device(on_device):
    """Seeded, tensors made where kernels run (conftest.on_device)."""


# ---- matrix products ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(dtype, bias):
    model = nn.Linear(C, 24, bias=bias).to(dtype)
    compile_and_check(model, [randn(R, C, dtype=dtype)], dtype, **OPTS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_3d_input(dtype):
    model = nn.Linear(C, 24).to(dtype)
    compile_and_check(model, [randn(B, S, C, dtype=dtype)], dtype, **OPTS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mm(dtype):
    check(lambda a, b: torch.mm(a, b), [randn(R, C, dtype=dtype), randn(C, 24, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_operator_3d_left(dtype):
    check(lambda a, b: a @ b, [randn(B, R, C, dtype=dtype), randn(C, 24, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_addmm(dtype):
    ins = [randn(24, dtype=dtype), randn(R, C, dtype=dtype), randn(C, 24, dtype=dtype)]
    check(lambda bias, a, b: torch.addmm(bias, a, b), ins, dtype)


# ---- elementwise ----

BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}
# (shape of a, shape of b): a row vector, a column, a 3-D broadcast, and a broadcast left side
BROADCASTS = [((R, C), (C,)), ((R, C), (R, 1)), ((B, S, H), (B, 1, H)), ((C,), (R, C))]


def nonzero(*shape, dtype):
    """Random values of either sign bounded away from 0 (divisors)."""
    return positive(*shape, dtype=dtype) * torch.where(torch.rand(shape) < 0.5, -1, 1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", BINARY)
def test_binary(name, dtype):
    check(BINARY[name], [randn(R, C, dtype=dtype), nonzero(R, C, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", BROADCASTS, ids=lambda s: f"{list(s[0])}x{list(s[1])}")
def test_binary_broadcast(shapes, dtype):
    # Every binary op on one pair, each result a model output (so none fuses into another).
    fns = list(BINARY.values())
    a, b = randn(*shapes[0], dtype=dtype), nonzero(*shapes[1], dtype=dtype)
    check(lambda a, b: tuple(fn(a, b) for fn in fns), [a, b], dtype)


SCALAR = {
    "add": lambda a: a + 1.5,
    "radd": lambda a: 2.0 + a,
    "sub": lambda a: a - 0.75,
    "rsub": lambda a: 1.0 - a,
    "mul": lambda a: a * 3.0,
    "div": lambda a: a / 4.0,
    "rdiv": lambda a: 2.0 / a,
    "add_alpha": lambda a: torch.add(a, a * 2, alpha=0.5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SCALAR)
def test_scalar_operand(name, dtype):
    a = positive(R, C, dtype=dtype)  # rdiv divides by it
    check(SCALAR[name], [a], dtype)


UNARY = {
    "neg": (lambda x: -x, randn),
    "exp": (torch.exp, randn),
    "rsqrt": (torch.rsqrt, positive),
    "sqrt": (torch.sqrt, positive),
    "sigmoid": (torch.sigmoid, randn),
    "silu": (F.silu, randn),
    "gelu": (F.gelu, randn),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), randn),
    "tanh": (torch.tanh, randn),
    "relu": (torch.relu, randn),
    "pow2": (lambda x: x.pow(2), randn),
    "pow3": (lambda x: x**3, randn),
    "pow_half": (lambda x: x**0.5, positive),
    "pow_frac": (lambda x: torch.pow(x, 1.7), positive),
    "pow_neg1": (lambda x: x**-1, positive),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", UNARY)
def test_unary(name, dtype):
    fn, make = UNARY[name]
    check(fn, [make(R, C, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unary_3d(dtype):
    check(lambda x: F.gelu(x) * torch.tanh(x), [randn(B, S, H, dtype=dtype)], dtype)


# ---- more elementwise: rounding, clamps, activations (some through torch._decomp) ----

MORE_UNARY = {
    "erf-exp2-log2-sign": lambda x: torch.erf(x) + torch.exp2(x) + torch.log2(x.abs() + 0.1) + torch.sign(x),
    "floor-ceil-trunc": lambda x: (x * 3).floor() + (x * 3).ceil() * 0.5 + (x * 3).trunc() * 0.25,
    "clamps": lambda x: x.clamp(-0.5, 0.5) + x.clamp(min=0.1) + F.hardtanh(x * 2) + x.clamp(max=x * 0 + 0.2),
    "activations": lambda x: F.leaky_relu(x, 0.1) + F.elu(x) + F.softplus(x) + F.hardswish(x) + F.hardsigmoid(x),
    "log1p-expm1-isnan": lambda x: torch.log1p(x.abs()) + torch.expm1(x) + torch.isnan(x.log()).float(),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MORE_UNARY)
def test_more_unary(name, dtype):
    check(MORE_UNARY[name], [randn(R, C, dtype=dtype)], dtype)


def test_log1p_expm1_and_tanh_keep_their_precision_near_zero():
    """log(1 + x), exp(x) - 1 and 2 sigmoid(2x) - 1 computed naively lose most digits at |x| ~ 1e-6."""
    check(
        lambda x: torch.log1p(x * 1e-6) * 1e6 + torch.expm1(x * 1e-6) * 1e6 + torch.tanh(x * 1e-6) * 1e6,
        [randn(R, C, dtype=torch.float32)],
        torch.float32,
        tol=1e-5,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_division(dtype):
    """Floor and truncating division, of floats and of integers (x // 3)."""
    check(
        lambda x: (
            torch.div(x * 5, 1.5, rounding_mode="floor")
            + torch.div(x * 5, 1.5, rounding_mode="trunc") * 0.5
            + ((x * 10).long() // 3).to(x.dtype)
        ),
        [randn(R, C, dtype=dtype)],
        dtype,
    )


# ---- dtype casts ----


def test_float_of_bf16():
    check(lambda x: x.float() * 3.0, [randn(R, C, dtype=torch.bfloat16)], torch.float32)


def test_to_bf16_of_fp32():
    check(lambda x: (x * 3.0).to(torch.bfloat16), [randn(R, C, dtype=torch.float32)], torch.bfloat16)


def test_cast_round_trip():
    # Eager rounds to bf16 in the middle, and so must the kernel: an fp32 tolerance cannot see
    # that, so compare exactly. Triton 3.6's interpreter truncates fp32 -> bf16 (its fp_trunc
    # ignores the rounding mode) where GPUs round to nearest even; both are accepted here.
    x = randn(R, C, dtype=torch.float32)
    _, out = check(lambda x: x.to(torch.bfloat16).float() + 1.0, [x], torch.float32, tol=TOL[torch.bfloat16])
    nearest = x.to(torch.bfloat16).float() + 1.0
    truncated = (x.view(torch.int32) & -65536).view(torch.float32) + 1.0
    assert torch.equal(out, nearest) or (INTERPRETING and torch.equal(out, truncated))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cast_is_output(dtype):
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    check(lambda x: x.to(other), [randn(R, C, dtype=dtype)], dtype, tol=TOL[torch.bfloat16])


# ---- reductions over the last dim, softmax ----

REDUCTIONS = {
    "sum": lambda x, k: x.sum(-1, keepdim=k),
    "mean": lambda x, k: x.mean(dim=-1, keepdim=k),
    "amax": lambda x, k: x.amax(-1, keepdim=k),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keepdim", [True, False])
@pytest.mark.parametrize("name", REDUCTIONS)
def test_reduce(name, keepdim, dtype):
    fn = REDUCTIONS[name]
    shape = (B, S, C) if keepdim else (R, C)  # both ranks, without doubling the test count
    check(lambda x: fn(x, keepdim), [randn(*shape, dtype=dtype)], dtype)


MORE_REDUCTIONS = {
    "var-std-var_mean": lambda x: (
        x.var(-1) + x.std(-1) + torch.var_mean(x, -1, correction=0)[0] + torch.var_mean(x, -1)[1]
    ),
    "log_softmax-logsumexp": lambda x: F.log_softmax(x * 3, -1) * 0.1 + torch.logsumexp(x, -1, keepdim=True),
    "amin-max-min": lambda x: (
        x.amin(-1) + x.max(-1).values + x.max(-1).indices + x.min(-1).values * 2 + x.min(-1).indices * 3
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", MORE_REDUCTIONS)
def test_more_reductions(name, dtype):
    check(MORE_REDUCTIONS[name], [randn(R, C, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_long_row(dtype):
    # A row longer than row_chunk is swept in several chunks.
    x = randn(3, 150, dtype=dtype)
    compile_and_check(Fn(lambda x: x.sum(-1)), [x], dtype, row_chunk=64, **OPTS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(R, C), (B, S, C)], ids=["2d", "3d"])
def test_softmax(shape, dtype):
    check(lambda x: torch.softmax(x * 3.0, dim=-1), [randn(*shape, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_long_row(dtype):
    x = randn(3, 150, dtype=dtype) * 4
    compile_and_check(Fn(lambda x: F.softmax(x, -1)), [x], dtype, row_chunk=64, **OPTS)


# ---- embedding ----


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding(dtype):
    model = nn.Embedding(50, H).to(dtype)
    ids = torch.randint(0, 50, (B, R))  # int64 indices are a model input
    compile_and_check(model, [ids], dtype, **OPTS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_then_linear(dtype):
    emb, lin = nn.Embedding(50, H).to(dtype), nn.Linear(H, 20).to(dtype)
    model = Fn(lambda ids: lin(emb(ids)))
    model.emb, model.lin = emb, lin  # registered, so their weights are parameters
    compile_and_check(model, [torch.randint(0, 50, (B, R))], dtype, **OPTS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_indexing(dtype):
    """x[idx] (2-D idx, negative ids from the end), index_select on dim 0 of a 3-D tensor and of
    a transposed one (its rows copied first)."""
    idx = torch.tensor([[3, -1, 0], [4, 2, -5]])
    sel = torch.tensor([1, 0, 1, 2])
    check(
        lambda x, y: (x[idx] * 2.0, torch.index_select(y, 0, sel), torch.index_select(x.t(), 0, sel)),
        [randn(R, C, dtype=dtype), randn(3, S, H, dtype=dtype)],
        dtype,
    )


def test_indexing_by_several_index_tensors_is_refused():
    """(One index tensor on any dim is a gather: tests/test_serve_steps.py.)"""
    idx = torch.tensor([0, 2])
    with pytest.raises(mkcompiler.UnsupportedOpError, match="one integer index tensor on one dim"):
        mkcompiler.compile(Fn(lambda x: x[idx, idx]), (randn(R, C, dtype=torch.float32),), **OPTS)


# ---- layout ops ----

LAYOUT = {
    "view": (lambda x: x.view(4, 50) * 2.0, [(R, C)]),
    "reshape_3d": (lambda x: x.reshape(R, 4, 10) + 1.0, [(R, C)]),
    "reshape_of_transpose": (lambda x: x.t().reshape(-1, 10) * 2.0, [(R, C)]),  # needs a copy
    "transpose_elementwise": (lambda x, y: x.t() + y, [(C, R), (R, C)]),
    "permute_elementwise": (lambda x, y: x.permute(2, 0, 1) * y, [(B, S, H), (H, B, S)]),
    "transpose_matmul_left": (lambda a, b: a.t() @ b, [(C, R), (C, 24)]),
    "transpose_matmul_right": (lambda a, b: a @ b.transpose(0, 1), [(R, C), (24, C)]),
    "permute_matmul": (lambda a, b: a.permute(1, 0) @ b, [(C, R), (C, 24)]),
    "slice_cols": (lambda x: x[:, 3:35] + 1.0, [(R, C)]),
    "slice_rows": (lambda x: x[1:4] * 2.0, [(R, C)]),
    "slice_step": (lambda x: x[:, ::3] - 1.0, [(R, C)]),
    "slice_matmul": (lambda a, b: a[:, 8:] @ b, [(R, C), (32, 24)]),
    "select": (lambda x: x[:, 2] + x[1, 0], [(B, S, H)]),
    "unsqueeze_expand": (lambda x, y: x.unsqueeze(1) * y, [(R, C), (R, 3, C)]),
    "cat_last": (lambda a, b: torch.cat([a * 2.0, b + 1.0], dim=-1), [(R, C), (R, 24)]),
    "cat_first": (lambda a, b: torch.cat([a, torch.sigmoid(b)], dim=0), [(R, C), (3, C)]),
    "cat_3d": (lambda a, b: torch.cat([a, b], dim=1) * 3.0, [(B, S, H), (B, 2, H)]),
    "contiguous": (lambda x: x.t().contiguous() * 2.0, [(R, C)]),
    "contiguous_output": (lambda x: (x * 2.0).t().contiguous(), [(R, C)]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LAYOUT)
def test_layout(name, dtype):
    fn, shapes = LAYOUT[name]
    check(fn, [randn(*s, dtype=dtype) for s in shapes], dtype)


# ---- norms ----


class HandRMSNorm(nn.Module):
    """RMSNorm as models write it: lowered through pow, mean, add, rsqrt, mul."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def _randomize(model):
    """Norm weights start at 1 and biases at 0; random ones make the test able to fail."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


NORMS = {
    "hand_rmsnorm": lambda: HandRMSNorm(C),
    "nn_rmsnorm": lambda: _randomize(nn.RMSNorm(C, eps=1e-5)),
    "nn_rmsnorm_default_eps": lambda: _randomize(nn.RMSNorm(C)),
    "nn_layernorm": lambda: _randomize(nn.LayerNorm(C)),
    "nn_layernorm_no_affine": lambda: nn.LayerNorm(C, elementwise_affine=False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NORMS)
def test_norm(name, dtype):
    model = NORMS[name]().to(dtype)
    x = randn(B, R, C, dtype=dtype) * 2 + 0.5  # a nonzero mean: layer norm must remove it
    compile_and_check(model, [x], dtype, **OPTS)


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_layer_norm(dtype):
    ins = [randn(R, C, dtype=dtype) + 1.0, randn(C, dtype=dtype), randn(C, dtype=dtype)]
    check(lambda x, w, b: F.layer_norm(x, (C,), w, b, eps=1e-5), ins, dtype)


# ---- fusion ----


def test_elementwise_chain_fuses_into_one_op():
    mk, _ = check(
        lambda x, y: x * torch.sigmoid(x) * y + 1.0,
        [randn(R, C, dtype=torch.float32), randn(R, C, dtype=torch.float32)],
        torch.float32,
    )
    assert len(mk.graph.ops) == 1, mk.graph.ops
    assert [k[0] for k in mk.queue.opcode_keys] == ["elementwise"], mk.queue.opcode_keys
    assert len(mk.queue) == -(-R * C // OPTS["elementwise_block"])  # one instruction per block


def test_elementwise_chain_after_matmul_fuses():
    mk, _ = check(
        lambda a, b, c: F.silu(a @ b) * c + 1.0,
        [randn(R, C, dtype=torch.float32), randn(C, 24, dtype=torch.float32), randn(R, 24, dtype=torch.float32)],
        torch.float32,
    )
    assert sorted(op.kind for op in mk.graph.ops) == ["elementwise", "matmul"], mk.graph.ops


# ---- refusals ----


@pytest.mark.parametrize(
    "fn, op",
    [(lambda x: torch.cumsum(x, dim=-1), "cumsum"), (lambda x: torch.sort(x, dim=-1).values, "sort")],
    ids=["cumsum", "sort"],
)
def test_unsupported_op_names_op_and_source(fn, op):
    with pytest.raises(mkcompiler.UnsupportedOpError) as info:
        mkcompiler.compile(Fn(fn), (randn(R, C, dtype=torch.float32),), **OPTS)
    message = str(info.value)
    assert op in message, message
    assert os.path.basename(__file__) in message, message


def test_reduction_over_other_dim_is_refused():
    with pytest.raises(mkcompiler.UnsupportedOpError, match="last dim"):
        mkcompiler.compile(Fn(lambda x: x.sum(0)), (randn(R, C, dtype=torch.float32),), **OPTS)


def test_a_fill_written_in_part_runs():
    """A zeros buffer written in part (HF Llama-1B's generate hands dynamo such a fill) is a
    constant-only elementwise node: it once generated `(0.0).to(tl.bfloat16)`, which fails (a
    Python float has no .to). Every constant-only node is a [BLOCK] tensor."""

    class Fill(torch.nn.Module):
        def forward(self, x):
            z = torch.zeros(x.shape, dtype=torch.bfloat16, device=x.device)
            z[:, 1:3] = x[:, 1:3].to(torch.bfloat16) * 3
            return z

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    mk = mkcompiler.compile(Fill(), (x,), cache=False)
    assert any("tl.zeros([BLOCK]" in line and "(0.0)" in line for line in mk.source.splitlines())
    out = mk(x)
    assert out[:, [0, 3, 4, 5, 6, 7]].abs().sum() == 0
    assert rel_err(out, Fill()(x)) <= 2e-2
