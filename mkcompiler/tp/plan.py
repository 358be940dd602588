"""Tensor parallelism: shard a model over N ranks and run every rank's megakernel program in
the reference VM. (On GPUs, one process per GPU: mkcompiler.compile(model, inputs,
tensor_parallel=N) under torchrun, mkcompiler/tp/runtime.py; tp_runtime.compile_world runs every
rank's generated kernel together in the Triton interpreter.)

    from mkcompiler.tp import plan as tp

    shards = tp.shard_ranks(model, world=4)         # default plan: decoder blocks by module names
    prefill = tp.compile_tp(shards, (tokens, torch.arange(P)))
    decode = tp.compile_tp(shards, (tokens[:, :1], torch.tensor([P])))
    logits = prefill(tokens, torch.arange(P), seed=0)   # rank 0's outputs (all ranks agree)
    tp.run_tp(model, inputs, world=2)               # shard + compile + run in one call

Plans use PyTorch's own vocabulary (torch.distributed.tensor.parallel), keyed by module name
(fnmatch patterns such as "layers.*.mlp.up" allowed), for nn.Linear modules:

  ColwiseParallel()                           output features split; output stays sharded
  ColwiseParallel(output_layouts=Replicate()) ... then all-gathered (vocab-parallel LM head)
  ColwiseParallel(input_layouts=Shard(-1))    input all-gathered first
  RowwiseParallel()                           input features split; output all-reduced (bias once, after)
  ExchangeParallel()                          (ours; attention outputs) rows exchanged between the
                                              ranks, whole weight on each rank's rows, rows gathered

Every rank must run the same program, its shard differing in tensors only (the passes and the
cross-rank waits rely on it; compile_tp checks it): so no plan entry may make a rank take its
slice of a replicated activation (RowwiseParallel(input_layouts=Replicate()) is refused).

`default_plan(model)` derives a plan for decoder blocks from Linear names: in a module with
query/key/value (wq, q_proj, ...) or gate/up (w1, w3, gate_proj, ...) Linears and exactly one
output Linear (wo, o_proj, down, w2, ...), the former are column-wise and the latter row-wise;
an lm_head / output Linear elsewhere is vocab-wise. Everything else is replicated.

`shard_model(model, rank, world, plan)` returns rank's module: a shallow copy of the module
tree sharing every unsharded parameter and buffer with `model`, whose sharded Linears hold
*views* (slices) of the model's weights, never copies, and call the communication custom ops
(`mkcompiler::all_reduce`, `mkcompiler::all_gather`, ops/comm.py) that torch.export records and
mkcompiler lowers. Attention modules whose projections are sharded get per-rank head counts and
per-rank KV caches (their own kv heads; state, updated in place) through ADAPTERS below: the only
place that knows attribute names of particular model classes. With more ranks than kv heads,
kv heads are replicated (rank r uses kv head r // (world / n_kv_heads)). default_plan leaves
attention modules without an adapter replicated; a hand-written plan that shards one anyway
keeps its global head counts, which is wrong: add an adapter.

Each rank compiles its shard through the normal pipeline (passes/pipeline.run_pipeline); the
ranks' queues must be identical (same program, different tensors). Communication tiles wait
on their peers' counters (passes/ranks.py); `vm.run_ranks` interleaves every rank's workers.
Launches are separated on every rank (the next call starts once every rank finished); on GPUs
each launch starts with a wait for every peer to have finished the previous one
(kernel_tp.launch_barrier) before a rank overwrites a buffer its peers read.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from mkcompiler.frontend.capture import bound_tensor, capture
from mkcompiler.ir.graph import BufferKind
from mkcompiler.ir.settings import Settings
from mkcompiler.ops.comm import all_gather, all_reduce, all_to_all
from mkcompiler.passes.pipeline import Compilation, run_pipeline
from mkcompiler.vm import RanksResult, VMProgram, rank_executor, run_ranks

try:  # PyTorch's plan vocabulary (CPU wheels have it too)
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
except ImportError:  # pragma: no cover: a torch built without distributed

    @dataclass(frozen=True)
    class Replicate:  # type: ignore[no-redef]
        pass

    @dataclass(frozen=True)
    class Shard:  # type: ignore[no-redef]
        dim: int

    class ColwiseParallel:  # type: ignore[no-redef]
        def __init__(self, *, input_layouts=None, output_layouts=None, use_local_output=True):
            self.input_layouts = (input_layouts or Replicate(),)
            self.output_layouts = (output_layouts or Shard(-1),)

    class RowwiseParallel:  # type: ignore[no-redef]
        def __init__(self, *, input_layouts=None, output_layouts=None, use_local_output=True):
            self.input_layouts = (input_layouts or Shard(-1),)
            self.output_layouts = (output_layouts or Replicate(),)


__all__ = [
    "ADAPTERS",
    "ColwiseParallel",
    "ExchangeParallel",
    "RowwiseParallel",
    "Replicate",
    "Shard",
    "TPCompilation",
    "compile_tp",
    "default_plan",
    "run_tp",
    "shard_model",
    "shard_ranks",
]


# ---- adapters: how attention modules of known model classes keep their head counts ----


@dataclass(frozen=True)
class HeadAdapter:
    """How one kind of attention module names its projections and head counts.

    matches(module): is it one of these. heads(module): (n_heads, n_kv_heads, head_dim).
    localize(shard, n_heads, n_kv_heads, shared): set the rank's head counts on the shard's
    shallow copy of the module (assign new attribute values; never mutate objects shared with
    the original). An object the whole model shares (a Hugging Face config) is copied once per
    shard through `shared` (original -> copy); every module of the shard that referenced the
    original then references the copy. state: module buffers holding per-kv-head state (KV
    caches) -> their kv-head dim: each rank gets a tensor of its own kv heads (initialised from
    the model's)."""

    name: str
    q: str
    k: str
    v: str
    o: str
    matches: Callable[[nn.Module], bool]
    heads: Callable[[nn.Module], tuple[int, int, int]]
    localize: Callable[[nn.Module, int, int, dict], None]
    state: tuple[tuple[str, int], ...] = ()


def _has_children(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _gpt_fast_localize(m: nn.Module, heads: int, kv_heads: int, shared: dict) -> None:
    # forward reshapes the attention output to (b, s, c.dim): on a rank that is heads x head_dim.
    m.c = dataclasses.replace(m.c, n_heads=heads, n_kv_heads=kv_heads, dim=heads * m.c.head_dim)


def _hf_localize(m: nn.Module, heads: int, kv_heads: int, shared: dict) -> None:
    # One config copy per shard, seen by every module (a StaticCache built from the shard's
    # config then holds the rank's kv heads); head_dim pinned (it may default to hidden / heads).
    if id(m.config) not in shared:
        config = copy.copy(m.config)
        config.head_dim = m.head_dim
        config.num_attention_heads, config.num_key_value_heads = heads, kv_heads
        shared[id(m.config)] = (m.config, config)
    m.config = shared[id(m.config)][1]
    m.num_key_value_groups = heads // kv_heads
    for attr, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
        if hasattr(m, attr):
            setattr(m, attr, value)


ADAPTERS: list[HeadAdapter] = [
    # examples/llama.py (gpt-fast style): config dataclass `c`, KV caches as module buffers.
    HeadAdapter(
        name="gpt-fast Attention (examples/llama.py)",
        q="wq",
        k="wk",
        v="wv",
        o="wo",
        matches=lambda m: (
            _has_children(m, "wq", "wk", "wv", "wo")
            and all(hasattr(getattr(m, "c", None), a) for a in ("n_heads", "n_kv_heads", "head_dim", "dim"))
        ),
        heads=lambda m: (m.c.n_heads, m.c.n_kv_heads, m.c.head_dim),
        localize=_gpt_fast_localize,
        state=(("k_cache", 1), ("v_cache", 1)),
    ),
    # Hugging Face Llama-like attention (Llama, Qwen2/3, Mistral): heads from `config`, the
    # shapes in forward come from head_dim and num_key_value_groups. Its KV cache lives outside
    # the module (a Cache object): build it from the shard's attention config.
    HeadAdapter(
        name="Hugging Face Llama-like attention",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        o="o_proj",
        matches=lambda m: (
            _has_children(m, "q_proj", "k_proj", "v_proj", "o_proj")
            and hasattr(getattr(m, "config", None), "num_attention_heads")
            and hasattr(m, "head_dim")
        ),
        heads=lambda m: (
            m.config.num_attention_heads,
            getattr(m.config, "num_key_value_heads", None) or m.config.num_attention_heads,
            m.head_dim,
        ),
        localize=_hf_localize,
    ),
]


def adapter_of(module: nn.Module) -> HeadAdapter | None:
    return next((a for a in ADAPTERS if a.matches(module)), None)


# ---- plans ----

QKV_NAMES = re.compile(r"^(wq|wk|wv|q_proj|k_proj|v_proj|query|key|value)$")
UP_NAMES = re.compile(r"^(w1|w3|gate|up|gate_proj|up_proj|fc1|c_fc)$")
OUT_NAMES = re.compile(r"^(wo|o_proj|out_proj|w2|down|down_proj|fc2)$")
HEAD_NAMES = re.compile(r"^(lm_head|output)$")


@dataclass(frozen=True)
class ExchangeParallel:
    """Plan entry for an attention output Linear: the post-attention exchange. Its input is the
    rank's heads for every row, as for RowwiseParallel; instead of partial products summed over
    the ranks, the ranks exchange row blocks (all_to_all: rank r gets every rank's heads for its
    rows), each applies the whole weight (a view of it: replicated, never copied) to its rows,
    and the rows are all-gathered. Fewer bytes cross NVLink than an all-reduce's, against
    world x the weight reads. Rows not divisible by the ranks (a decode of fewer sequences than
    ranks): row-wise, as RowwiseParallel."""


def default_plan(model: nn.Module, exchange: bool = False) -> dict[str, object]:
    """Column-wise Q/K/V and gate/up, row-wise O and down, vocab-wise LM head, from names.

    A module is sharded only as a whole: column-wise inputs and exactly one row-wise output
    Linear among its children (else its Linears stay replicated). An attention module must have
    an adapter (ADAPTERS) for its head counts, or stays replicated. exchange: attention output
    Linears take ExchangeParallel instead of RowwiseParallel."""
    plan: dict[str, object] = {}
    for fqn, module in model.named_modules():
        linears = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
        cols = [n for n in linears if QKV_NAMES.match(n) or UP_NAMES.match(n)]
        outs = [n for n in linears if OUT_NAMES.match(n)]
        if not cols or len(outs) != 1:
            continue
        if any(QKV_NAMES.match(n) for n in cols):
            adapter = adapter_of(module)
            if adapter is None:
                continue
            cols = [adapter.q, adapter.k, adapter.v]
            outs = [adapter.o]
        prefix = f"{fqn}." if fqn else ""
        plan.update({prefix + n: ColwiseParallel() for n in cols})
        attention = any(QKV_NAMES.match(n) for n in linears)
        plan[prefix + outs[0]] = ExchangeParallel() if exchange and attention else RowwiseParallel()
    for fqn, module in model.named_modules():
        name = fqn.rpartition(".")[2]
        if isinstance(module, nn.Linear) and HEAD_NAMES.match(name) and fqn not in plan:
            plan[fqn] = ColwiseParallel(output_layouts=Replicate())
    return plan


@dataclass(frozen=True)
class _Style:
    """What a plan entry means for one Linear."""

    colwise: bool
    gather_input: bool = False  # colwise: all_gather the (sharded) input first
    gather_output: bool = False  # colwise: all_gather the output
    exchange: bool = False  # row-wise input, rows exchanged (ExchangeParallel)


def _is_shard_last(p) -> bool:
    return isinstance(p, Shard) and p.dim == -1


def _style(fqn: str, entry) -> _Style:
    layouts = lambda xs: xs[0] if isinstance(xs, tuple) else xs  # noqa: E731
    if isinstance(entry, ColwiseParallel):
        inp, out = layouts(entry.input_layouts), layouts(entry.output_layouts)
        if not (isinstance(inp, Replicate) or _is_shard_last(inp)) or not (
            isinstance(out, Replicate) or _is_shard_last(out)
        ):
            raise NotImplementedError(f"{fqn}: ColwiseParallel with layouts {inp} -> {out}")
        return _Style(True, gather_input=_is_shard_last(inp), gather_output=isinstance(out, Replicate))
    if isinstance(entry, RowwiseParallel):
        inp, out = layouts(entry.input_layouts), layouts(entry.output_layouts)
        if not isinstance(out, Replicate):
            raise NotImplementedError(f"{fqn}: RowwiseParallel with output {out} (reduce-scatter) is not supported")
        if not _is_shard_last(inp):
            # Taking the rank's slice of a replicated activation would put the rank into the
            # program (a view offset): ranks must run the same program, differing in tensors only.
            raise NotImplementedError(
                f"{fqn}: RowwiseParallel with input {inp} (only a sharded input, Shard(-1), is supported: "
                "make the producer column-wise)"
            )
        return _Style(False)
    if isinstance(entry, ExchangeParallel):
        return _Style(False, exchange=True)
    raise NotImplementedError(
        f"{fqn}: plan entry {type(entry).__name__} is not supported (ColwiseParallel, RowwiseParallel and "
        "ExchangeParallel are)"
    )


def resolve_plan(model: nn.Module, plan: dict) -> dict[str, _Style]:
    """Plan keys (module names or fnmatch patterns) -> {Linear name: style}."""
    modules = dict(model.named_modules())
    styles: dict[str, _Style] = {}
    for key, entry in plan.items():
        names = [n for n in modules if n and fnmatch.fnmatchcase(n, key)] if any(c in key for c in "*?[") else [key]
        if not names or any(n not in modules for n in names):
            raise KeyError(f"tensor-parallel plan key {key!r} names no module of {type(model).__name__}")
        for n in names:
            if not isinstance(modules[n], nn.Linear):
                raise NotImplementedError(
                    f"{n}: only nn.Linear modules can be sharded, not {type(modules[n]).__name__}"
                )
            styles[n] = _style(n, entry)
    return styles


# ---- sharded Linears ----


def _view(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


class ColwiseLinear(nn.Module):
    """Output features [lo, hi) of a Linear: weight and bias are views of the original's."""

    def __init__(self, linear: nn.Linear, lo: int, hi: int, world: int, style: _Style):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, hi - lo
        self.weight = _view(linear.weight[lo:hi])
        self.bias = _view(None if linear.bias is None else linear.bias[lo:hi])
        self.world, self.gather_input, self.gather_output = world, style.gather_input, style.gather_output

    def forward(self, x):
        if self.gather_input:
            x = all_gather(x, -1, self.world)
        y = F.linear(x, self.weight, self.bias)
        return all_gather(y, -1, self.world) if self.gather_output else y


class RowwiseLinear(nn.Module):
    """Input features [lo, hi) of a Linear (weight: a view of the original's), the partial
    products summed over the ranks (all_reduce), then the bias (the original's), once."""

    def __init__(self, linear: nn.Linear, lo: int, hi: int, world: int, style: _Style):
        super().__init__()
        self.in_features, self.out_features = hi - lo, linear.out_features
        self.weight = _view(linear.weight[:, lo:hi])
        self.bias = _view(linear.bias)
        self.world = world

    def forward(self, x):
        y = all_reduce(F.linear(x, self.weight), self.world)
        return y + self.bias if self.bias is not None else y


class ExchangeLinear(nn.Module):
    """ExchangeParallel: the rank's input features [lo, hi) (its heads) of every row; rows
    exchanged (all_to_all), the whole weight (a view) applied to the rank's rows, the rows
    all-gathered, the bias added with them. Rows not divisible by the ranks: as RowwiseLinear
    (with a view of the weight's columns [lo, hi)). Every rank decides alike: shapes are static."""

    def __init__(self, linear: nn.Linear, lo: int, hi: int, world: int, style: _Style):
        super().__init__()
        self.in_features, self.out_features = hi - lo, linear.out_features
        self.weight = _view(linear.weight)
        self.part = _view(linear.weight[:, lo:hi])
        self.bias = _view(linear.bias)
        self.world = world

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if rows % self.world:
            y = all_reduce(F.linear(x, self.part), self.world)
            return y + self.bias if self.bias is not None else y
        mine = all_to_all(x.reshape(rows, x.shape[-1]), self.world)  # [rows / world, all features]
        y = all_gather(F.linear(mine, self.weight, self.bias), 0, self.world)
        return y.reshape(*x.shape[:-1], self.out_features)


# ---- sharding ----


def _even(n: int, rank: int, world: int, what: str) -> tuple[int, int]:
    if n % world:
        raise ValueError(f"{what}: {n} is not divisible by {world} ranks")
    return rank * n // world, (rank + 1) * n // world


@dataclass
class _Heads:
    adapter: HeadAdapter
    heads: int  # per rank
    kv_heads: int  # per rank
    kv_first: int  # the rank's first kv head
    head_dim: int
    q_first: int


def _heads_of(fqn: str, module: nn.Module, adapter: HeadAdapter, rank: int, world: int) -> _Heads:
    n_heads, n_kv, head_dim = adapter.heads(module)
    if n_heads % world:
        raise ValueError(f"{fqn}: {n_heads} attention heads cannot be split over {world} ranks")
    if n_kv % world == 0:
        kv_heads, kv_first = n_kv // world, rank * (n_kv // world)
    elif world % n_kv == 0:  # more ranks than kv heads: each kv head on world / n_kv ranks
        kv_heads, kv_first = 1, rank // (world // n_kv)
    else:
        raise ValueError(f"{fqn}: {n_kv} kv heads can be neither split nor replicated over {world} ranks")
    heads = n_heads // world
    return _Heads(adapter, heads, kv_heads, kv_first, head_dim, rank * heads)


def shard_model(model: nn.Module, rank: int, world: int, plan: dict | None = None) -> nn.Module:
    """Rank `rank`'s shard of `model` (see the module docstring). `plan`: default_plan(model)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    styles = resolve_plan(model, default_plan(model) if plan is None else plan)
    modules = dict(model.named_modules())
    heads: dict[str, _Heads] = {}
    for parent in sorted({n.rpartition(".")[0] for n in styles}):
        adapter = adapter_of(modules[parent])
        if adapter is None:
            continue
        roles = {r: f"{parent}.{getattr(adapter, r)}" if parent else getattr(adapter, r) for r in "qkvo"}
        planned = {r: roles[r] in styles for r in roles}
        if not any(planned.values()):
            continue
        plain = _Style(True)  # column-wise, input replicated, output sharded: the rank's heads
        if not all(planned.values()) or any(styles[roles[r]] != plain for r in "qkv") or styles[roles["o"]].colwise:
            raise ValueError(
                f"{parent}: an attention module is sharded as a whole (q, k, v column-wise, o row-wise); plan has "
                + ", ".join(f"{roles[r]}: {'col' if styles[roles[r]].colwise else 'row'}" for r in roles if planned[r])
            )
        heads[parent] = _heads_of(parent, modules[parent], adapter, rank, world)
    replaced: dict[str, nn.Module] = {}
    for fqn, style in styles.items():
        linear = modules[fqn]
        parent, _, child = fqn.rpartition(".")
        h = heads.get(parent)
        if style.colwise:
            if h is not None and child in (h.adapter.k, h.adapter.v):
                lo, hi = h.kv_first * h.head_dim, (h.kv_first + h.kv_heads) * h.head_dim
            elif h is not None:  # q
                lo, hi = h.q_first * h.head_dim, (h.q_first + h.heads) * h.head_dim
            else:
                lo, hi = _even(linear.out_features, rank, world, f"{fqn} output features")
            replaced[fqn] = ColwiseLinear(linear, lo, hi, world, style)
        else:
            lo, hi = _even(linear.in_features, rank, world, f"{fqn} input features")
            if h is not None:
                assert (lo, hi) == (h.q_first * h.head_dim, (h.q_first + h.heads) * h.head_dim), fqn
            replaced[fqn] = (ExchangeLinear if style.exchange else RowwiseLinear)(linear, lo, hi, world, style)
    shared: dict[int, tuple] = {}
    shard = _clone(model, "", replaced, heads, shared)
    if shared:  # point every module of the shard at the shard's copies of shared objects
        for m in shard.modules():
            for name, value in list(vars(m).items()):
                if not name.startswith("_") and id(value) in shared and shared[id(value)][0] is value:
                    setattr(m, name, shared[id(value)][1])
    return shard


def _clone(module: nn.Module, fqn: str, replaced: dict, heads: dict, shared: dict) -> nn.Module:
    """A shallow copy of the module tree: same parameters and buffers, own containers."""
    if fqn in replaced:
        return replaced[fqn]
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._modules = {
        name: None if child is None else _clone(child, f"{fqn}.{name}" if fqn else name, replaced, heads, shared)
        for name, child in module._modules.items()
    }
    h = heads.get(fqn)
    if h is not None:
        h.adapter.localize(new, h.heads, h.kv_heads, shared)
        for name, dim in h.adapter.state:
            state = module._buffers[name]
            new._buffers[name] = state.narrow(dim, h.kv_first, h.kv_heads).clone()  # this rank's own state
    return new


def shard_ranks(model: nn.Module, world: int, plan: dict | None = None) -> list[nn.Module]:
    """Every rank's shard of `model`."""
    return [shard_model(model, r, world, plan) for r in range(world)]


def storage_owner(t: torch.Tensor, model: nn.Module) -> str | None:
    """Name of the parameter of `model` whose storage holds every element of `t` (a view of it), or None."""
    lo = t.data_ptr()
    hi = lo + (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))) * t.element_size()
    for name, p in model.named_parameters(remove_duplicate=False):
        base = p.untyped_storage()
        if base.data_ptr() <= lo and hi <= base.data_ptr() + base.nbytes():
            return name
    return None


# ---- compile and run in the reference VM ----


def _same_program(comps: list[Compilation]) -> None:
    """Every rank must run the same program: identical queues (and so counters and views)."""
    q0 = comps[0].queue
    for r, c in enumerate(comps[1:], start=1):
        q = c.queue
        same = q.opcode_keys == q0.opcode_keys and q.num_counters == q0.num_counters
        for name in ("rows", "waits", "views", "worker_begin", "worker_order"):
            same = same and np.array_equal(getattr(q, name), getattr(q0, name))
        if not same:
            raise AssertionError(f"rank {r} compiled a different program than rank 0: tensor-parallel ranks must match")


def _rebind(comp: Compilation, shard: nn.Module) -> Compilation:
    """rank 0's compilation reading `shard`'s parameters and state (same names, shapes, strides)."""
    tensors = dict(shard.named_parameters(remove_duplicate=False))
    tensors.update(dict(shard.named_buffers(remove_duplicate=False)))
    params = {}
    for bid, t0 in comp.graph.params.items():
        buf = comp.graph.buffers[bid]
        t = tensors.get(buf.name)
        if t is None:  # a constant folded at capture: the same on every rank
            params[bid] = t0
            continue
        t = bound_tensor(buf.name, t, buf.kind)
        if (t.shape, t.stride(), t.dtype) != (t0.shape, t0.stride(), t0.dtype):
            raise AssertionError(f"{buf.name}: the ranks' shards disagree in shape or strides")
        params[bid] = t
    return dataclasses.replace(comp, graph=dataclasses.replace(comp.graph, params=params))


class TPCompilation:
    """Every rank's compiled program for one input shape, run together in the reference VM.
    Counters persist across calls (targets scale with the launch number), as on the GPU."""

    def __init__(self, shards: list[nn.Module], compilations: list[Compilation]):
        self.shards = shards
        self.world = len(shards)
        self.compilations = compilations
        self.programs = [VMProgram(c) for c in compilations]
        self.counters = [np.zeros(max(c.queue.num_counters, 1), dtype=np.int64) for c in compilations]
        self.generation = 0
        self.settings = compilations[0].settings

    @property
    def queue(self):
        """Every rank's queue (they are identical)."""
        return self.compilations[0].queue

    def run(self, *inputs, seed: int = 0, choose=None, dynamic: bool | None = None, poison: bool = True):
        """One launch on every rank with the same (replicated) inputs. Returns (per-rank outputs,
        RanksResult). `poison` fills intermediates with NaN first, so a tile read before it was
        written shows. `choose((rank, worker) moves)` picks the interleaving (default: seeded)."""
        for p in self.programs:
            p.bind(inputs)
            if poison:
                p.poison()
        self.generation += 1
        dynamic = self.settings.schedule != "static" if dynamic is None else dynamic
        threads = torch.get_num_threads()
        # The references are tiny: intra-op threads only add synchronisation, which costs
        # milliseconds per op on a loaded machine.
        torch.set_num_threads(1)
        try:
            result: RanksResult = run_ranks(
                [p.queue for p in self.programs],
                [rank_executor(self.programs, r) for r in range(self.world)],
                dynamic=dynamic,
                seed=seed,
                choose=choose,
                counters=self.counters,
                generation=self.generation,
            )
        finally:
            torch.set_num_threads(threads)
        return [p.outputs() for p in self.programs], result

    def __call__(self, *inputs, seed: int = 0, **kwargs):
        """Rank 0's outputs (after all-reduce / all-gather every rank holds the same)."""
        outputs, _ = self.run(*inputs, seed=seed, **kwargs)
        return outputs[0]


def compile_tp(
    shards: list[nn.Module], example_inputs, *, num_workers: int = 2, each_rank: bool = True, **options
) -> TPCompilation:
    """Compile every rank's shard (called as shard(*example_inputs)) for the reference VM.
    Options are mkcompiler.Settings fields. each_rank=False captures rank 0 only and binds the
    other ranks' tensors to its program (faster; valid for shards from shard_model, which differ
    in tensors only: same names, shapes and strides, checked)."""
    settings = Settings().replace(**options).for_target()
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    if each_rank:
        comps = [run_pipeline(capture(s, example_inputs), settings, num_workers) for s in shards]
        _same_program(comps)
    else:
        first = run_pipeline(capture(shards[0], example_inputs), settings, num_workers)
        comps = [first] + [_rebind(first, s) for s in shards[1:]]
    for c in comps:
        for bid, t in c.graph.params.items():  # state is per rank: no two ranks may share it
            if c.graph.buffers[bid].kind == BufferKind.STATE:
                assert all(
                    t.untyped_storage().data_ptr() != o.graph.params[bid].untyped_storage().data_ptr()
                    for o in comps
                    if o is not c
                ), f"ranks share the state {c.graph.buffers[bid].name!r}"
    return TPCompilation(list(shards), comps)


def run_tp(model: nn.Module, example_inputs, world: int, plan: dict | None = None, seed: int = 0, **options):
    """Shard `model` over `world` ranks, compile every shard and run them once in the VM on
    `example_inputs`; returns rank 0's outputs (equal to model(*example_inputs))."""
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    shards = shard_ranks(model, world, plan)
    return compile_tp(shards, example_inputs, **options)(*example_inputs, seed=seed)


def outputs_equal(a, b) -> bool:
    """Same structure and bit-identical tensors."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb)
    )
