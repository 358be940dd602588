"""`mkcompiler.compile`: the public entry point."""

from __future__ import annotations

import os

import torch

from mkcompiler.capture import capture
from mkcompiler.codegen import generate
from mkcompiler.errors import UnsupportedOpError
from mkcompiler.fallback import SegmentedModel, compile_with_fallback
from mkcompiler.passes.pipeline import run_pipeline
from mkcompiler.runtime import Megakernel, check_num_workers
from mkcompiler.settings import Settings

INTERPRETER_WORKERS = 4


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
    settings = Settings().replace(**options)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    interpret = interpreting if settings.interpret is None else settings.interpret
    if interpret != interpreting:
        raise ValueError(
            f"interpret={settings.interpret} but TRITON_INTERPRET={'1' if interpreting else 'unset'}: "
            "Triton picks interpreter or GPU when kernels are defined; set TRITON_INTERPRET before importing mkcompiler"
        )
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    device = _device_of(model, example_inputs)
    if interpret and device.type != "cpu":
        raise ValueError("the Triton interpreter runs megakernels on CPU tensors; move the model and inputs to the CPU")
    if not interpret and device.type != "cuda":
        raise ValueError(f"megakernels run on CUDA GPUs; the model is on {device}")
    if settings.num_workers is not None:
        num_workers = settings.num_workers
    elif interpret:
        num_workers = INTERPRETER_WORKERS
    else:
        num_workers = torch.cuda.get_device_properties(device).multi_processor_count
    check_num_workers(num_workers, device, interpret)  # before the (slow) capture
    try:
        graph = capture(model, example_inputs)
    except UnsupportedOpError:
        if settings.fallback != "eager":
            raise
        # Megakernels for what compiles, eager PyTorch for the rest (a warning names what fell back).
        return compile_with_fallback(model, example_inputs, options, compile)
    comp = run_pipeline(graph, settings, num_workers)
    return Megakernel(comp, generate(comp.queue), device, interpret)
