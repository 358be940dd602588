"""passes/canonicalize.py: every spelling of a norm, an activation (plain or gating) and a softmax
compiles to the structure of its canonical spelling (F.rms_norm, F.layer_norm, F.silu, F.gelu,
torch.softmax, torch.log_softmax): the same op kinds, instruction count and dependent stages
(the longest chain of the tile DAG), and matches eager in fp32 on fresh random inputs."""

import functools
import math
from collections import Counter

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from mkcompiler.passes.canonicalize import canonicalize

import mkcompiler
from mkcompiler.frontend.capture import capture
from tests.helpers import rel_err

C = 32  # row length; gated activations read x of 2C columns as (gate, up)
EPS = 1e-6
TOL = 1e-4


def phi(x):
    """The standard normal CDF, written out."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def halves(x):
    return x.chunk(2, dim=-1)


def ln_by_hand(x, eps=EPS):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def ln_by_moments(x, eps=EPS):
    mu = x.sum(-1, keepdim=True) / C
    var = (x * x).mean(-1, keepdim=True) - mu * mu
    return (x - mu) * (var + eps) ** -0.5


def ln_by_var_mean(x, eps=EPS):
    var, mu = torch.var_mean(x, -1, keepdim=True, correction=0)
    return (x - mu) / (var + eps).sqrt()


def ln_by_var(x, eps=EPS):
    return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)


# pattern -> (canonical spelling, other spellings); each f(m, x) with m.w, m.b of C elements.
GALLERY = {
    "rms_norm": (
        lambda m, x: F.rms_norm(x, (C,), m.w, EPS),
        {
            "issue": lambda m, x: (
                (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * m.w
            ),
            "hf_weight_first": lambda m, x: m.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype),
            "sum_over_n_division": lambda m, x: x * m.w / torch.sqrt((x * x).sum(-1, keepdim=True) / C + EPS),
            "square_reciprocal_no_keepdim": lambda m, x: (
                x * (1 / torch.sqrt(torch.square(x).mean(-1) + EPS)).unsqueeze(-1) * m.w
            ),
            "eps_inside_the_mean": lambda m, x: x * torch.rsqrt((x * x + EPS).mean(-1, keepdim=True)) * m.w,
            "eps_first_power": lambda m, x: m.w * x * (EPS + x.pow(2).mean(-1, keepdim=True)) ** -0.5,
        },
    ),
    "rms_norm_no_weight": (
        lambda m, x: F.rms_norm(x, (C,), None, EPS),
        {
            "rsqrt": lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS),
            "division": lambda m, x: x / (x.square().sum(-1, keepdim=True) / C + EPS).sqrt(),
        },
    ),
    "layer_norm": (
        lambda m, x: F.layer_norm(x, (C,), m.w, m.b, EPS),
        {
            "issue": lambda m, x: ln_by_hand(x) * m.w + m.b,
            "var": lambda m, x: m.b + ln_by_var(x) * m.w,
            "var_mean": lambda m, x: m.w * ln_by_var_mean(x) + m.b,
            "moments": lambda m, x: ln_by_moments(x) * m.w + m.b,
            "casts": lambda m, x: (ln_by_hand(x.float()) * m.w.float()).to(x.dtype) + m.b,
        },
    ),
    "layer_norm_no_bias": (
        lambda m, x: F.layer_norm(x, (C,), m.w, None, EPS),
        {"issue": lambda m, x: ln_by_hand(x) * m.w, "moments": lambda m, x: m.w * ln_by_moments(x)},
    ),
    "layer_norm_no_affine": (
        lambda m, x: F.layer_norm(x, (C,), None, None, EPS),
        {
            "issue": lambda m, x: ln_by_hand(x),
            "var": lambda m, x: ln_by_var(x),
            "moments": lambda m, x: ln_by_moments(x),
        },
    ),
    "silu": (
        lambda m, x: F.silu(x),
        {
            "x_sigmoid": lambda m, x: x * torch.sigmoid(x),
            "sigmoid_x": lambda m, x: torch.sigmoid(x) * x,
            "exp_division": lambda m, x: x / (1 + torch.exp(-x)),
            "reciprocal": lambda m, x: x * (1.0 / (1.0 + torch.exp(-x))),
            "tanh": lambda m, x: x * 0.5 * (1 + torch.tanh(x / 2)),
        },
    ),
    "gelu": (
        lambda m, x: F.gelu(x),
        {
            "erf": lambda m, x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
            "erf_constant": lambda m, x: x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476)),
            "x_phi": lambda m, x: x * phi(x),
            "phi_x": lambda m, x: phi(x) * x,
        },
    ),
    "gelu_tanh": (
        lambda m, x: F.gelu(x, approximate="tanh"),
        {
            "tanh": lambda m, x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3)))),
            "tanh_factored": lambda m, x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
            "sigmoid": lambda m, x: x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x)),
            "cube": lambda m, x: x * 0.5 * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x**3))),
        },
    ),
    "swiglu": (
        lambda m, x: F.silu(halves(x)[0]) * halves(x)[1],
        {
            "sigmoid": lambda m, x: halves(x)[0] * torch.sigmoid(halves(x)[0]) * halves(x)[1],
            "sigmoid_up_first": lambda m, x: halves(x)[0] * (torch.sigmoid(halves(x)[0]) * halves(x)[1]),
            "exp_division": lambda m, x: halves(x)[1] * halves(x)[0] / (1 + torch.exp(-halves(x)[0])),
            "up_times_silu": lambda m, x: halves(x)[1] * F.silu(halves(x)[0]),
        },
    ),
    "geglu": (
        lambda m, x: F.gelu(halves(x)[0]) * halves(x)[1],
        {
            "erf": lambda m, x: 0.5 * halves(x)[0] * (1 + torch.erf(halves(x)[0] / math.sqrt(2))) * halves(x)[1],
            "x_phi": lambda m, x: halves(x)[1] * (halves(x)[0] * phi(halves(x)[0])),
            "up_first": lambda m, x: halves(x)[1] * halves(x)[0] * phi(halves(x)[0]),
            "up_times_gelu": lambda m, x: halves(x)[1] * F.gelu(halves(x)[0]),
        },
    ),
    "softmax": (
        lambda m, x: torch.softmax(x, -1),
        {
            "issue": lambda m, x: (
                torch.exp(x - x.amax(-1, keepdim=True)) / torch.exp(x - x.amax(-1, keepdim=True)).sum(-1, keepdim=True)
            ),
            "max_values": lambda m, x: (lambda e: e / e.sum(-1, keepdim=True))(
                torch.exp(x - x.max(-1, keepdim=True).values)
            ),
            "no_max": lambda m, x: torch.exp(x) / torch.exp(x).sum(-1, keepdim=True),
            "reciprocal_no_keepdim": lambda m, x: (
                torch.exp(x - x.amax(-1, keepdim=True))
                * (1 / torch.exp(x - x.amax(-1, keepdim=True)).sum(-1)).unsqueeze(-1)
            ),
            "logsumexp": lambda m, x: torch.exp(x - torch.logsumexp(x, -1, keepdim=True)),
        },
    ),
    "log_softmax": (
        lambda m, x: torch.log_softmax(x, -1),
        {
            "written_out": lambda m, x: (
                x - x.amax(-1, keepdim=True) - torch.log(torch.exp(x - x.amax(-1, keepdim=True)).sum(-1, keepdim=True))
            ),
            "logsumexp": lambda m, x: x - torch.logsumexp(x, -1, keepdim=True),
            "shifted": lambda m, x: (lambda s: s - s.exp().sum(-1, keepdim=True).log())(
                x - x.max(-1, keepdim=True).values
            ),
            "no_max": lambda m, x: x - torch.log(torch.exp(x).sum(-1, keepdim=True)),
        },
    ),
}
GATED = {"swiglu", "geglu"}


class Spelled(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.w = torch.nn.Parameter(torch.rand(C) + 0.5)
        self.b = torch.nn.Parameter(torch.randn(C))

    def forward(self, x):
        return self.fn(self, x)


def example(pattern: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2 * C if pattern in GATED else C, generator=g)
    return x + 2.0 if "norm" in pattern else x  # a mean far from 0: LayerNorm's centring matters


@functools.cache
def structure(pattern: str, spelling: str | None):
    """(op kinds, instructions, dependent stages) of a spelling's megakernel, and the megakernel."""
    canonical, others = GALLERY[pattern]
    torch.manual_seed(0)
    model = Spelled(canonical if spelling is None else others[spelling])
    mk = mkcompiler.compile(model, (example(pattern, 0),), cache=False)
    kinds = Counter(op.kind for op in mk.graph.ops)
    return (kinds, len(mk.queue), nx.dag_longest_path_length(mk.dag.graph) + 1), mk, model


CASES = [(p, s) for p, (_, others) in GALLERY.items() for s in others]


@pytest.mark.parametrize("pattern,spelling", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_every_spelling_compiles_like_the_canonical_one(pattern, spelling):
    want, _, _ = structure(pattern, None)
    got, mk, model = structure(pattern, spelling)
    assert got == want
    x = example(pattern, 1)
    assert rel_err(mk(x), model(x)) <= TOL


@pytest.mark.parametrize("pattern", list(GALLERY))
def test_canonical_spellings_match_eager(pattern):
    _, mk, model = structure(pattern, None)
    x = example(pattern, 2)
    assert rel_err(mk(x), model(x)) <= TOL


def graph_kinds(fn, x) -> list[str]:
    torch.manual_seed(0)
    return [op.kind for op in canonicalize(capture(Spelled(fn), (x,))).ops]


@pytest.mark.parametrize(
    "pattern,spelling,kinds",
    [
        ("rms_norm", "issue", ["norm"]),
        ("layer_norm", "issue", ["norm"]),
        ("softmax", "issue", ["softmax"]),
        ("swiglu", "sigmoid_up_first", ["elementwise"]),
    ],
)
def test_the_issues_spellings_become_one_op(pattern, spelling, kinds):
    """The op graph itself, before fusion (quick: no kernel)."""
    assert graph_kinds(GALLERY[pattern][1][spelling], example(pattern, 0)) == kinds


def test_hugging_faces_bf16_rms_norm_is_one_op():
    """LlamaRMSNorm: x cast up once, normalised, cast back, times the weight (bf16)."""

    def hf(m, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return m.w * h.to(x.dtype)

    torch.manual_seed(0)
    graph = canonicalize(capture(Spelled(hf).to(torch.bfloat16), (example("rms_norm", 0).bfloat16(),)))
    assert [op.kind for op in graph.ops] == ["norm"]
    assert graph.ops[0].inputs[0].dtype == torch.bfloat16  # x itself, not its fp32 copy


def test_rms_norm_is_one_norm_op_on_the_cpu_too():
    """F.rms_norm is kept whole at capture (a CPU export would decompose it) and nn.RMSNorm too."""
    x = example("rms_norm", 0)
    assert graph_kinds(GALLERY["rms_norm"][0], x) == ["norm"]
    torch.manual_seed(0)
    assert [op.kind for op in capture(torch.nn.RMSNorm(C, eps=EPS), (x,)).ops] == ["norm"]


def test_eps_outside_the_square_root_is_not_a_norm():
    """x / (sqrt(mean(x^2)) + eps) is another function: left as it is, and still right."""
    fn = GALLERY["rms_norm"][1]["eps_inside_the_mean"]
    other = lambda m, x: x / (torch.sqrt((x * x).mean(-1, keepdim=True)) + 1e-2) * m.w  # noqa: E731
    x = example("rms_norm", 0)
    assert graph_kinds(fn, x) == ["norm"]
    assert "norm" not in graph_kinds(other, x)
    torch.manual_seed(0)
    model = Spelled(other)
    mk = mkcompiler.compile(model, (x,), cache=False)
    x = example("rms_norm", 3)
    assert rel_err(mk(x), model(x)) <= TOL


class SpelledNormLinear(torch.nn.Module):
    """The issue's RMSNorm spelling before a projection, in decode's shape (one row)."""

    def __init__(self, spelled: bool):
        super().__init__()
        self.spelled = spelled
        self.norm = torch.nn.RMSNorm(C, eps=EPS)
        self.proj = torch.nn.Linear(C, 48, bias=False)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        if self.spelled:
            w = self.norm.weight
            h = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w
        else:
            h = self.norm(x)
        return self.proj(h)


def test_a_spelled_norm_folds_into_the_matmul_like_rms_norm():
    """passes/fuse_norm.py folds the canonicalised norm into the projection, as it does nn.RMSNorm."""
    x = torch.randn(1, 1, C) + 1.0
    got = {}
    for spelled in (False, True):
        torch.manual_seed(0)
        model = SpelledNormLinear(spelled)
        mk = mkcompiler.compile(model, (x,), cache=False)
        assert [op.kind for op in mk.graph.ops] == ["matmul"] and mk.graph.ops[0].attrs.norm is not None
        y = torch.randn(1, 1, C)
        assert rel_err(mk(y), model(y)) <= TOL
        got[spelled] = (len(mk.queue), nx.dag_longest_path_length(mk.dag.graph))
    assert got[True] == got[False]
