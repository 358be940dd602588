"""`mkcompiler.compile`: the public entry point."""

from __future__ import annotations

import gc
import os
import time

import torch

from mkcompiler.backends.triton.codegen import generate
from mkcompiler.backends.triton.codegen_tp import is_tensor_parallel
from mkcompiler.errors import UnsupportedOpError
from mkcompiler.frontend.capture import capture
from mkcompiler.frontend.checks import check_model
from mkcompiler.ir.settings import Settings, triton_interprets
from mkcompiler.passes.pipeline import run_pipeline
from mkcompiler.runtime.fallback import SegmentedModel, compile_with_fallback
from mkcompiler.runtime.megakernel import Megakernel, check_num_workers
from mkcompiler.tools import cache
from mkcompiler.tools.progress import Progress

CPU_WORKERS = 4  # default num_workers without a GPU (the interpreter, or a GPU kernel generated only)


def _device_of(model: torch.nn.Module, example_inputs) -> torch.device:
    for t in (
        list(model.parameters()) + list(model.buffers()) + [x for x in example_inputs if isinstance(x, torch.Tensor)]
    ):
        return t.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compile(model: torch.nn.Module, example_inputs, **options) -> Megakernel | SegmentedModel:
    """Compile `model` (called as model(*example_inputs)) into one persistent megakernel.

    Options are the fields of `mkcompiler.Settings` (num_workers, schedule, ...). With
    fallback="eager", a model with ops mkcompiler cannot compile becomes a SegmentedModel."""
    tensor_parallel = options.pop("tensor_parallel", None)
    tp_plan, tp_group = options.pop("tp_plan", None), options.pop("tp_group", None)
    make = Megakernel
    if tensor_parallel not in (None, 1):
        # This process's rank of a torch.distributed group (torchrun): its shard, and a megakernel
        # whose shared buffers live in symmetric memory (mkcompiler/tp/runtime.py).
        from mkcompiler.tp import runtime as tp_runtime

        if options.get("fallback", "error") != "error":
            raise NotImplementedError("tensor_parallel with fallback='eager' is not supported")
        options.setdefault("cache", False)  # every rank compiles its own shard (no shared cache entries)
        model, make = tp_runtime.prepare_rank(model, tensor_parallel, tp_plan, tp_group)
    elif tp_plan is not None or tp_group is not None:
        raise ValueError("tp_plan and tp_group need tensor_parallel=N")
    # The target (Settings.interpret) is decided here, once; the passes, codegen, cache and runtime read it.
    settings = _settings(options)
    interpret = settings.interpret
    if interpret and not triton_interprets():
        raise ValueError(
            "interpret=True but Triton compiles for the GPU in this process (TRITON_INTERPRET unset): Triton picks "
            "interpreter or GPU when kernels are defined; set TRITON_INTERPRET=1 before importing mkcompiler"
        )
    # interpret=False where Triton interprets: GPU source to read or compile offline, not to run
    # (Megakernel.launch refuses; tools/offline.py compiles it for sm_90).
    generate_only = not interpret and triton_interprets()
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    check_model(model, example_inputs)  # a model that would compile into a wrong answer: a ModelError naming why
    device = _device_of(model, example_inputs)
    if interpret and device.type != "cpu":
        raise ValueError("the Triton interpreter runs megakernels on CPU tensors; move the model and inputs to the CPU")
    if not interpret and not generate_only and device.type != "cuda":
        raise ValueError(f"megakernels run on CUDA GPUs; the model is on {device}")
    if settings.num_workers is not None:
        num_workers = settings.num_workers
    elif device.type == "cuda":
        num_workers = torch.cuda.get_device_properties(device).multi_processor_count * settings.workers_per_sm
    else:
        num_workers = CPU_WORKERS
    no_sm_limit = device.type != "cuda"  # interpreted programs run one after another; no GPU to fill
    check_num_workers(num_workers, device, no_sm_limit, settings.workers_per_sm)  # before the (slow) capture
    progress = Progress(settings.progress)
    # Compiling allocates millions of small objects; the cyclic garbage collector would rescan
    # torch.export's object graph again and again (about a fifth of a 1B-model compile). Cycles
    # made meanwhile (a few MB) are collected after, by the next automatic collection.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        mk = _compile(model, example_inputs, options, settings, num_workers, device, progress, make)
    except BaseException:
        progress.close(f"failed in {progress.step_name}")
        raise
    finally:
        if gc_was_enabled:
            gc.enable()
    status = getattr(getattr(mk, "compilation", None), "cache", "off")
    progress.close("compiled" + {"hit": " (cached)", "graph hit": " (cached passes)"}.get(status, ""))
    return mk


def _settings(options: dict) -> Settings:
    """The options over the defaults, the target's filled in (Settings.for_target)."""
    return Settings().replace(**options).for_target()


def _compile(model, example_inputs, options, settings, num_workers, device, progress, make=Megakernel):
    """Capture, passes, kernel; with settings.cache, the cache (mkcompiler/tools/cache.py) may skip the
    passes (graph key) or capture and passes (model key). `make` builds the Megakernel."""
    timings: dict[str, float] = {}
    use_cache = settings.cache
    read_cache = use_cache and not settings.dump_dir  # dumps come from running the passes
    env = cache.environment(settings, num_workers, device) if use_cache else None
    comp = mkey = graph = None
    try:
        if read_cache:
            progress.step("cache lookup")
            t0 = time.perf_counter()
            mkey = cache.model_key(model, example_inputs, env)
            timings["trace"] = time.perf_counter() - t0
            if mkey is not None:
                comp = cache.load_model(mkey, model, settings, num_workers, device)
                if comp is not None:
                    timings["cache_load"] = time.perf_counter() - t0 - timings["trace"]
        if comp is None or settings.debug >= 1:  # debug: check the hit against a fresh capture
            progress.step("capture")
            t0 = time.perf_counter()
            graph = capture(model, example_inputs)
            timings["capture"] = time.perf_counter() - t0
    except UnsupportedOpError:
        if settings.fallback != "eager":
            raise
        # Megakernels for what compiles, eager PyTorch for the rest (a warning names what fell back).
        progress.step("fallback segments")  # one progress line: the segments' compiles show none
        return compile_with_fallback(model, example_inputs, {**options, "progress": False}, compile)
    if use_cache and graph is not None:
        sources = cache.param_sources(graph, model)
        gkey = cache.graph_key(graph, env, sources)
        use_cache, read_cache = gkey is not None, read_cache and gkey is not None
        if comp is not None and gkey is not None and comp.graph_key != gkey:
            raise AssertionError(
                "mkcompiler cache: the model key of this model led to a graph that its capture does not give; "
                "compile with cache=False and report the model"
            )
        if comp is None and read_cache:
            t0 = time.perf_counter()
            comp = cache.load_graph(gkey, graph, settings, num_workers)
            if comp is not None:
                timings["cache_load"] = time.perf_counter() - t0
                if mkey is not None:
                    cache.link(mkey, gkey, sources)
    if comp is None:
        comp = run_pipeline(graph, settings, num_workers, on_pass=progress.step)
        if use_cache:
            progress.step("cache store")
            t0 = time.perf_counter()
            cache.store(comp, gkey, sources, mkey, checked=settings.debug >= 1)
            comp.timings["cache_store"] = time.perf_counter() - t0
            comp.cache = "miss"
    comp.timings = {**timings, **comp.timings}
    progress.step("codegen")
    if settings.backend == "gluon" and make is Megakernel:
        from mkcompiler.runtime.gluon import compile_gluon  # None: warned, the Triton backend runs it

        mk = compile_gluon(comp, model, device)
        if mk is not None:
            return mk
        # The passes tiled for the Gluon backend (one ring box, its large-M tile): the Triton
        # kernel gets its own tiling, from a compile for it.
        triton = _settings({**options, "backend": "triton"})  # the Triton backend's own defaults (warps)
        return _compile(model, example_inputs, {**options, "backend": "triton"}, triton, num_workers, device, progress)
    source = generate(comp.queue, settings.preload_args, settings.early_weights)
    if settings.dump_dir:  # beside the passes' dumps: the kernel as a standalone file
        os.makedirs(settings.dump_dir, exist_ok=True)
        with open(os.path.join(settings.dump_dir, "megakernel.py"), "w") as f:
            f.write(source)
    if make is Megakernel and is_tensor_parallel(comp.queue):
        raise NotImplementedError(
            "the model has tensor-parallel communication ops (a shard from mkcompiler.tp.plan): its kernel reads peer "
            "ranks' memory. Compile the whole model with tensor_parallel=N in every process of a torchrun group, "
            "or run the shards together with mkcompiler.tp.plan.compile_tp (reference VM) or "
            "mkcompiler.tp.runtime.compile_world (interpreter)"
        )
    return make(comp, source, device)
