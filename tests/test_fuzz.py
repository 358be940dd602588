"""Fuzzing against eager: hypothesis builds random models from the supported op set, and each
compiles and computes what eager computes.

A model is a `Program`: inputs (shape, dtype) and steps, each an op applied to earlier values
(so intermediates are reused and residual branches appear), returning the last value and
sometimes an earlier one. Ops: Linear with/without bias, matmuls with a transposed operand,
unary and binary elementwise ops (broadcasting, python scalars, parameter vectors), casts
between fp32 and bf16, sum/mean/amax over the last dim, softmax, layer_norm/rms_norm,
reshape/transpose/slice/cat. Every op is continuous and kept in its safe domain (log(|x|+1),
x / (|y|+1), ...), so the float64 result is a well-defined target.

Checked paths: compile + the reference VM (mkcompiler.vm.run_megakernel: tiling, fusion,
dependencies, counters, schedule) for many models; compile + the Triton interpreter (the
generated kernel itself) for a smaller number.

The reference: the same program in float64 with no rounding at all ("exact"). A model's
error is ||out - exact|| / ||exact||, per output (against an RMS of NEAR_ZERO where the exact
output is smaller: a cancellation's relative error means nothing). It must be within the dtype's tolerance
(fp32 1e-4; 3e-2 once any value is bf16) or within 4x eager's own error in the model's dtypes.
Why the second clause: the megakernel rounds where eager rounds (each node's result is stored
in its dtype), so in an ill-conditioned bf16 chain (softmax of large logits, a norm of a
nearly constant row, a difference of close values) eager itself is far from exact; the
kernel is then held to eager's accuracy, not to an accuracy no bf16 computation has. Every op
is continuous, so a real bug (a wrong tile, a missed wait, a wrong view) is far outside both.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st

import mkcompiler
from mkcompiler.vm import run_megakernel

VM_EXAMPLES = int(os.environ.get("MKCOMPILER_FUZZ_VM", "300"))
KERNEL_EXAMPLES = int(os.environ.get("MKCOMPILER_FUZZ_KERNEL", "25"))
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
EAGER_FACTOR = 4.0
MAX_NUMEL = 1024  # per value: keeps the VM and the interpreter fast
DTYPES = (torch.float32, torch.bfloat16)


# ---- the op set: one function per op, shared by eager, the exact reference and shape inference ----

UNARY = {
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "neg": torch.neg,
    "abs": torch.abs,
    "square": lambda x: x * x,
    "cube": lambda x: x**3,
    "sin": torch.sin,
    "cos": torch.cos,
    "exp_neg_abs": lambda x: torch.exp(-x.abs()),
    "log_abs1": lambda x: torch.log(x.abs() + 1.0),
    "sqrt_abs": lambda x: x.abs().sqrt(),
    "rsqrt_abs1": lambda x: torch.rsqrt(x.abs() + 1.0),
    "recip_abs1": lambda x: 1.0 / (x.abs() + 1.0),
}
BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div_abs1": lambda a, b: a / (b.abs() + 1.0),
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}
SCALAR = {
    "add_s": lambda x, c: x + c,
    "rsub_s": lambda x, c: c - x,
    "mul_s": lambda x, c: x * c,
    "div_s": lambda x, c: x / c,
}
REDUCE = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax}


@dataclass(frozen=True)
class Value:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Step:
    """One op: `kind`, the values it reads (indices), and its constant arguments."""

    kind: str
    args: tuple[int, ...]
    attrs: tuple = ()

    def __repr__(self):
        return f"{self.kind}{self.args}{list(self.attrs) if self.attrs else ''}"


@dataclass(frozen=True)
class Program:
    inputs: tuple[Value, ...]
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]

    def __repr__(self):
        lines = [f"inputs {[(v.shape, str(v.dtype)[6:]) for v in self.inputs]}"]
        n = len(self.inputs)
        lines += [f"  v{n + i} = {s}" for i, s in enumerate(self.steps)]
        lines.append(f"  return {[f'v{o}' for o in self.outputs]}")
        return "\n".join(lines)


def param_shapes(step: Step, vals: list[Value]) -> dict[str, tuple[tuple[int, ...], torch.dtype, str]]:
    """Parameters a step owns: name -> (shape, dtype, init)."""
    x = vals[step.args[0]] if step.args else None
    a = dict(step.attrs)
    if step.kind == "linear":
        params = {"weight": ((a["out"], x.shape[-1]), x.dtype, "fan_in")}
        if a["bias"]:
            params["bias"] = ((a["out"],), x.dtype, "small")
        return params
    if step.kind in ("layer_norm", "rms_norm") and a["affine"]:
        params = {"weight": ((x.shape[-1],), x.dtype, "one")}
        if step.kind == "layer_norm":
            params["bias"] = ((x.shape[-1],), x.dtype, "small")
        return params
    if step.kind == "param_binary":
        return {"p": (a["shape"], x.dtype, "unit")}
    return {}


def apply(step: Step, xs: list[torch.Tensor], p: dict[str, torch.Tensor], cast) -> torch.Tensor:
    """Run one step. `cast(dtype)` maps a dtype to the one to compute in (float64 when exact)."""
    a = dict(step.attrs)
    x = xs[0] if xs else None
    k = step.kind
    if k == "unary":
        return UNARY[a["fn"]](x)
    if k == "binary":
        return BINARY[a["fn"]](x, xs[1])
    if k == "param_binary":
        return BINARY[a["fn"]](x, p["p"]) if not a["swap"] else BINARY[a["fn"]](p["p"], x)
    if k == "scalar":
        return SCALAR[a["fn"]](x, a["c"])
    if k == "cast":
        return x.to(cast(a["dtype"]))
    if k == "linear":
        return F.linear(x, p["weight"], p.get("bias"))
    if k == "matmul_bt":  # x @ y.T
        return x @ xs[1].to(x.dtype).t()
    if k == "matmul_at":  # x.T @ y
        return x.t() @ xs[1].to(x.dtype)
    if k == "reduce":
        return REDUCE[a["fn"]](x, dim=-1, keepdim=a["keepdim"])
    if k == "softmax":
        return torch.softmax(x, dim=-1)
    if k == "layer_norm":
        return F.layer_norm(x, x.shape[-1:], p.get("weight"), p.get("bias"), eps=1e-5)
    if k == "rms_norm":
        return F.rms_norm(x, x.shape[-1:], p.get("weight"), eps=1e-6)
    if k == "reshape":
        return x.reshape(a["shape"])
    if k == "transpose":
        return x.transpose(a["d0"], a["d1"])
    if k == "slice":
        index = [slice(None)] * x.dim()
        index[a["dim"]] = slice(a["start"], a["end"], a["step"])
        return x[tuple(index)]
    if k == "cat":
        return torch.cat([x, xs[1].to(x.dtype)], dim=a["dim"])
    raise AssertionError(k)


def meta_value(step: Step, vals: list[Value]) -> Value:
    """The step's result shape and dtype, from running it on meta tensors."""
    xs = [torch.empty(vals[i].shape, dtype=vals[i].dtype, device="meta") for i in step.args]
    p = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d, _) in param_shapes(step, vals).items()}
    out = apply(step, xs, p, lambda d: d)
    return Value(tuple(out.shape), out.dtype)


def init_param(t: torch.Tensor, init: str) -> torch.Tensor:
    if init == "fan_in":  # Linear weights: outputs as large as inputs
        return t / math.sqrt(t.shape[-1])
    if init == "small":
        return 0.1 * t
    if init == "one":  # norm weights
        return 1.0 + 0.1 * t
    return t


class FuzzModel(torch.nn.Module):
    """A Program as a module. `exact=True` computes everything in float64 (casts included)."""

    def __init__(self, program: Program, seed: int):
        super().__init__()
        self.program = program
        self.exact = False
        self.param_names: list[list[str]] = []
        g = torch.Generator().manual_seed(seed)
        vals = list(program.inputs)
        for i, step in enumerate(program.steps):
            for name, (shape, dtype, init) in param_shapes(step, vals).items():
                t = init_param(torch.randn(shape, generator=g), init)
                self.register_parameter(f"s{i}_{name}", torch.nn.Parameter(t.to(dtype), requires_grad=False))
            self.param_names.append(list(param_shapes(step, vals)))
            vals.append(meta_value(step, vals))

    def forward(self, *inputs):
        vals = list(inputs)
        cast = (lambda d: torch.float64) if self.exact else (lambda d: d)
        for i, (step, names) in enumerate(zip(self.program.steps, self.param_names)):
            p = {n: getattr(self, f"s{i}_{n}") for n in names}
            vals.append(apply(step, [vals[j] for j in step.args], p, cast))
        return tuple(vals[o] for o in self.program.outputs)


# ---- the generator ----

# Mostly small; sometimes past a 16-wide tile, so matmuls and rows split into several tiles.
dims = st.integers(1, 12) | st.sampled_from([16, 17, 20, 33])


def broadcastable(a: tuple, b: tuple) -> bool:
    try:
        return torch.broadcast_shapes(a, b) == torch.Size(a)  # b broadcasts onto a
    except RuntimeError:
        return False


@st.composite
def shapes(draw):
    rank = draw(st.sampled_from([2, 1, 3, 2]))  # rank 2 most often: what matmuls take
    return tuple(draw(dims) for _ in range(rank))


@st.composite
def related_shape(draw, shape: tuple):
    """A shape that broadcasts against `shape`, or one of its own."""
    kind = draw(st.sampled_from(["same", "last", "ones", "scalar", "other"]))
    if kind == "same":
        return shape
    if kind == "last":
        return shape[-1:]
    if kind == "ones":  # size-1 dims in random places
        return tuple(1 if draw(st.booleans()) else s for s in shape)
    if kind == "scalar":
        return ()
    return draw(shapes())


def reshape_choices(shape: tuple) -> list[tuple]:
    out = [(-1,), (1, *shape)]
    if len(shape) >= 2:
        out.append((*shape[:-2], shape[-2] * shape[-1]))
        out.append((-1, shape[-1]))
    for f in (2, 3):
        if shape[-1] % f == 0 and shape[-1] > f and len(shape) < 4:
            out.append((*shape[:-1], f, shape[-1] // f))
    return [s for s in out if len(s) <= 4]


@st.composite
def a_step(draw, vals: list[Value], allow_casts: bool) -> Step:
    """One random step over `vals`; hypothesis shrinks towards early values and simple ops."""
    i = draw(st.integers(0, len(vals) - 1).map(lambda k: len(vals) - 1 - k))  # recent first
    x = vals[i]
    kinds = [
        "unary",
        "binary",
        "scalar",
        "param_binary",
        "reduce",
        "softmax",
        "layer_norm",
        "rms_norm",
        "reshape",
        "slice",
        "cat",
    ]
    if x.shape:  # the matmul family twice over: few values have the rank it needs
        kinds += ["linear"] * 2 if len(x.shape) in (2, 3) else []
        kinds += ["matmul_bt", "matmul_at"] * 2 if len(x.shape) == 2 else []
        kinds += ["transpose"] if len(x.shape) >= 2 else []
    else:
        kinds = ["unary", "binary", "scalar", "param_binary"]
    kinds += ["cast"] if allow_casts else []
    kind = draw(st.sampled_from(kinds))
    if kind == "unary":
        return Step(kind, (i,), (("fn", draw(st.sampled_from(sorted(UNARY)))),))
    if kind == "binary":
        others = [j for j, v in enumerate(vals) if broadcastable(x.shape, v.shape)]
        j = draw(st.sampled_from(others))  # x itself is always there
        args = (i, j) if draw(st.booleans()) else (j, i)  # the broadcast operand on either side
        return Step(kind, args, (("fn", draw(st.sampled_from(sorted(BINARY)))),))
    if kind == "param_binary":
        shape = tuple(draw(related_shape(x.shape)))
        shape = shape if broadcastable(x.shape, shape) else x.shape[-1:]
        return Step(
            kind, (i,), (("fn", draw(st.sampled_from(sorted(BINARY)))), ("shape", shape), ("swap", draw(st.booleans())))
        )
    if kind == "scalar":
        c = draw(st.sampled_from([0.5, -1.25, 2.0, 3.0]))
        return Step(kind, (i,), (("fn", draw(st.sampled_from(sorted(SCALAR)))), ("c", c)))
    if kind == "cast":
        return Step(kind, (i,), (("dtype", torch.bfloat16 if x.dtype == torch.float32 else torch.float32),))
    if kind == "linear":
        return Step(kind, (i,), (("out", draw(dims)), ("bias", draw(st.booleans()))))
    if kind in ("matmul_bt", "matmul_at"):
        d = 1 if kind == "matmul_bt" else 0
        others = [j for j, v in enumerate(vals) if len(v.shape) == 2 and v.shape[d] == x.shape[d]]
        return Step(kind, (i, draw(st.sampled_from(others))))
    if kind == "reduce":
        return Step(kind, (i,), (("fn", draw(st.sampled_from(sorted(REDUCE)))), ("keepdim", draw(st.booleans()))))
    if kind in ("softmax",):
        return Step(kind, (i,))
    if kind in ("layer_norm", "rms_norm"):
        return Step(kind, (i,), (("affine", draw(st.booleans())),))
    if kind == "reshape":
        return Step(kind, (i,), (("shape", draw(st.sampled_from(reshape_choices(x.shape)))),))
    if kind == "transpose":
        d0, d1 = draw(st.lists(st.integers(0, len(x.shape) - 1), min_size=2, max_size=2, unique=True))
        return Step(kind, (i,), (("d0", d0), ("d1", d1)))
    if kind == "slice":
        dim = draw(st.integers(0, len(x.shape) - 1))
        n = x.shape[dim]
        start = draw(st.integers(0, n - 1))
        end = draw(st.integers(start + 1, n))
        return Step(
            kind, (i,), (("dim", dim), ("start", start), ("end", end), ("step", draw(st.sampled_from([1, 1, 2]))))
        )
    if kind == "cat":
        dim = draw(st.integers(0, len(x.shape) - 1))
        others = [
            j
            for j, v in enumerate(vals)
            if len(v.shape) == len(x.shape)
            and all(a == b for d, (a, b) in enumerate(zip(v.shape, x.shape)) if d != dim)
        ]
        return Step(kind, (i, draw(st.sampled_from(others))), (("dim", dim),))
    raise AssertionError(kind)


DTYPE_MODES = {
    "fp32": (st.just(torch.float32), False),  # no casts: the 1e-4 tolerance applies
    "bf16": (st.just(torch.bfloat16), True),  # bf16 inputs; casts to fp32 and back
    "mixed": (st.sampled_from(DTYPES), True),
}


@st.composite
def programs(draw, mode: str = "mixed", max_steps: int = 8, max_numel: int = MAX_NUMEL):
    dtype, allow_casts = DTYPE_MODES[mode]
    first = draw(shapes())
    inputs = [Value(first, draw(dtype))]
    if draw(st.booleans()):
        inputs.append(Value(draw(related_shape(first)) or first, draw(dtype)))
    vals = list(inputs)
    steps = []
    for _ in range(draw(st.integers(2, max_steps))):
        step = draw(a_step(vals, allow_casts))
        v = meta_value(step, vals)
        if math.prod(v.shape) > max_numel or 0 in v.shape:
            continue
        steps.append(step)
        vals.append(v)
        event(f"op {step.kind}")
    assume(steps)
    outputs = [len(vals) - 1]
    if len(steps) > 1 and draw(st.booleans()):  # an intermediate is an output too
        outputs.insert(0, draw(st.integers(len(inputs), len(vals) - 2)))
    return Program(tuple(inputs), tuple(steps), tuple(outputs))


compile_options = st.fixed_dictionaries(
    dict(
        num_workers=st.integers(1, 4),
        schedule=st.sampled_from(["dynamic", "static"]),
        matmul_tile=st.sampled_from([(16, 16, 16), (32, 16, 16), (16, 32, 32)]),
        split_k=st.sampled_from([None, 1, 2]),
        elementwise_block=st.sampled_from([16, 32, 64]),
        row_block=st.sampled_from([1, 2, 4]),
        row_chunk=st.sampled_from([16, 1024]),  # 16: rows longer than 16 are swept in steps
    )
)


# ---- checking ----


def random_inputs(program: Program, seed: int, device="cpu") -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(v.shape, generator=g).to(device, v.dtype) for v in program.inputs)


def exact_twin(model: FuzzModel) -> FuzzModel:
    """The model in float64 with no rounding at all (casts included): the reference."""
    exact_model = copy.deepcopy(model).double()
    exact_model.exact = True
    return exact_model


def references(model: FuzzModel, exact_model: FuzzModel, inputs) -> tuple[tuple, tuple]:
    """(eager, exact) outputs on `inputs`."""
    with torch.no_grad():
        return model(*inputs), exact_model(*(x.double() for x in inputs))


def moderate(targets) -> bool:
    """Away from overflow: every target finite and moderate."""
    return all(bool(torch.isfinite(t.double()).all()) and t.double().abs().max() < 1e6 for t in targets)


def make_case(program: Program, seed: int):
    model = FuzzModel(program, seed)
    inputs = random_inputs(program, seed + 1)
    eager, exact = references(model, exact_twin(model), inputs)
    assume(moderate(exact + eager))
    return model, inputs, eager, exact


def floor_of(program: Program) -> float:
    """bf16's tolerance once any value is bf16 (parameters take their input's dtype)."""
    vals = list(program.inputs)
    for step in program.steps:
        vals.append(meta_value(step, vals))
    return FLOOR[torch.bfloat16] if any(v.dtype == torch.bfloat16 for v in vals) else FLOOR[torch.float32]


# Inputs are standard normal (O(1)); an output whose exact value is near zero against that (the
# mean of a normalised row: a cancellation) has no meaningful relative error, so below this RMS
# an output's error is measured against it (an absolute error). A wrong tile, a missed wait or a
# wrong view is O(1) wrong, far outside either. (Found by hypothesis: mean(layer_norm(x)), exact
# 0, eager 0 by its rounding order, the kernel -4e-8.)
NEAR_ZERO = 1e-3


def fuzz_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    """||out - exact|| / max(||exact||, NEAR_ZERO x sqrt(numel)); NaN anywhere fails (as rel_err)."""
    out, exact = out.double(), exact.double()
    if torch.isnan(out).any():
        return float("inf")
    scale = max(exact.norm().item(), NEAR_ZERO * math.sqrt(max(exact.numel(), 1)))
    return (out - exact).norm().item() / scale


def mismatches(program, outs, eager, exact) -> list[str]:
    """One line per output outside its tolerance (the module docstring's rule); empty when all pass."""
    floor = floor_of(program)
    outs = pytree.tree_leaves(outs)
    if len(outs) != len(exact):
        return [f"{len(outs)} outputs, expected {len(exact)}"]
    bad = []
    for k, (o, e, r) in enumerate(zip(outs, eager, exact)):
        if o.shape != r.shape or o.dtype != e.dtype:
            bad.append(f"output {k}: {tuple(o.shape)} {o.dtype}, expected {tuple(r.shape)} {e.dtype}")
            continue
        err, eager_err = fuzz_err(o, r), fuzz_err(e, r)
        tol = max(floor, EAGER_FACTOR * eager_err)
        if err > tol:
            bad.append(f"output {k}: relative error {err:.3g} > {tol:.3g} (eager's own: {eager_err:.3g})")
    return bad


def check_outputs(program, outs, eager, exact) -> None:
    if any(EAGER_FACTOR * fuzz_err(e, r) > floor_of(program) for e, r in zip(eager, exact)):
        event("tolerance from eager's own error")
    bad = mismatches(program, outs, eager, exact)
    assert not bad, "\n".join(bad) + f"\n{program}"


# No explain phase: it re-runs a failing example dozens of times (compiles are slow) and
# the minimal program printed with the failure says what it would.
FUZZ = dict(
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.timeout(600)  # room to shrink a failure; a passing run takes well under a minute
@pytest.mark.parametrize("mode", list(DTYPE_MODES))
@settings(max_examples=VM_EXAMPLES // len(DTYPE_MODES), **FUZZ)
@given(data=st.data(), options=compile_options, seed=st.integers(0, 2**16), vm_seed=st.integers(0, 2**16))
def test_random_models_match_eager_in_the_vm(mode, data, options, seed, vm_seed):
    program = data.draw(programs(mode), label="program")
    model, inputs, eager, exact = make_case(program, seed)
    mk = mkcompiler.compile(model, inputs, **options)
    mk.poison()
    outs, _ = run_megakernel(mk, *inputs, seed=vm_seed)
    check_outputs(program, outs, eager, exact)


# Programs run one after another in the interpreter: a static schedule runs on one worker.
kernel_options = compile_options.map(lambda o: {**o, "schedule": "dynamic"} if o["num_workers"] > 1 else o)


@pytest.mark.timeout(600)
@settings(max_examples=KERNEL_EXAMPLES, **FUZZ)
@given(data=st.data(), options=kernel_options, seed=st.integers(0, 2**16))
def test_random_models_match_eager_in_the_kernel(data, options, seed):
    """The generated Triton kernel itself, in the interpreter (small programs: ~20 ms per instruction)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("fuzzes the CPU interpreter")
    program = data.draw(programs(data.draw(st.sampled_from(list(DTYPE_MODES))), max_steps=4, max_numel=256))
    model, inputs, eager, exact = make_case(program, seed)
    mk = mkcompiler.compile(model, inputs, **options)
    mk.poison()
    check_outputs(program, mk(*inputs), eager, exact)
