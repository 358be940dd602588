"""Models that would compile into a wrong answer, refused with a ModelError that names the tensor
or attribute: tensors on several devices (or on the meta device), example inputs that require grad
in training mode (checked before tracing, by check_model), and a forward that changes Python
attributes (capture compares attribute_state before export with what forward left)."""

from __future__ import annotations

import dataclasses
import enum
import inspect

import torch
import torch.utils._pytree as pytree

from mkcompiler.errors import ModelError


def check_model(model: torch.nn.Module, example_inputs: tuple) -> None:
    """Raise ModelError, before any tracing, for tensors on several devices (or on the meta device,
    with no data) and for example inputs that require grad in training mode (a megakernel computes
    no gradients)."""
    weights = [(f"parameter {n!r}", t) for n, t in model.named_parameters()]
    weights += [(f"buffer {n!r}", t) for n, t in model.named_buffers()]
    names = _argument_names(model)
    inputs = [
        (f"example input {i}" + (f" ({names[i]!r})" if i < len(names) else ""), t)
        for i, x in enumerate(example_inputs)
        for t in pytree.tree_leaves(x)
        if isinstance(t, torch.Tensor)
    ]
    _check_one_device(weights + inputs)
    if model.training and torch.is_grad_enabled():
        for what, t in inputs:
            if t.requires_grad:
                raise ModelError(
                    f"{what} requires grad and the model is in training mode: a megakernel computes no "
                    "gradients; compile for inference (model.eval(), torch.no_grad(), inputs without requires_grad)"
                )


def _check_one_device(named: list[tuple[str, torch.Tensor]]) -> None:
    if not named:
        return
    first, device = named[0][0], named[0][1].device
    for what, t in named[1:]:
        if t.device != device:
            raise ModelError(
                f"{what} is on {t.device} but {first} is on {device}: a megakernel runs on one device; "
                "move the model and its inputs there (model.to(device))"
            )
    if device.type == "meta":
        raise ModelError(
            f"{first} is on the meta device: it has no data to compile with; load the weights first "
            "(model.to_empty(device=...) and load_state_dict)"
        )


def _argument_names(model: torch.nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def plain_value(x, depth: int = 0):
    """A stable description of an attribute value: plain values by value, others by type."""
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
        return x
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format, enum.Enum)):
        return str(x)
    if depth < 4:
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, [plain_value(v, depth + 1) for v in x])
        if isinstance(x, dict):
            return ("dict", sorted((repr(k), plain_value(v, depth + 1)) for k, v in x.items()))
        if isinstance(x, (set, frozenset)):
            return ("set", sorted(repr(plain_value(v, depth + 1)) for v in x))
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            fields = [(f.name, plain_value(getattr(x, f.name), depth + 1)) for f in dataclasses.fields(x)]
            return (type(x).__qualname__, fields)
    return ("object", type(x).__module__, type(x).__qualname__)


def attribute_state(model: torch.nn.Module) -> dict[tuple[str, str], tuple]:
    """(module path, attribute) -> (value, description) of every module's public Python attributes."""
    return {
        (path, k): (v, plain_value(v))
        for path, m in model.named_modules(remove_duplicate=False)
        for k, v in vars(m).items()
        if not k.startswith("_")
    }


def _changed(old: tuple | None, new: tuple | None) -> bool:
    """Plain values compare by value (a container rebuilt equal is unchanged), objects by identity."""
    if old is None or new is None or old[1] != new[1]:
        return True
    return isinstance(old[1], tuple) and old[1][:1] == ("object",) and old[0] is not new[0]


def check_attributes_unchanged(model: torch.nn.Module, before: dict, after: dict) -> None:
    """forward runs once, at export: a Python attribute it changes would change once, not at every
    call of the megakernel (nor would what depends on it). torch.export restores the attributes
    forward rebinds, silently: `after` is what forward left, seen by a forward hook."""
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if not _changed(old, new):
            continue
        path, attr = key
        if old is None:
            change = f"sets it to {_short(new[0])}"
            if attr in vars(model.get_submodule(path)):  # export leaves new attributes: the model is left as it was
                delattr(model.get_submodule(path), attr)
        elif new is None:
            change = "deletes it"
        elif old[0] is new[0]:
            change = f"changes it in place, to {_short(new[0])}"
        else:
            change = f"from {_short(old[0])} to {_short(new[0])}"
        where = f"of submodule {path!r}" if path else "of the model"
        raise ModelError(
            f"forward changes the Python attribute {attr!r} {where} ({change}): a megakernel would not repeat "
            "the change at each call. Keep per-call state in a registered buffer updated in place, or outside "
            "the model"
        )


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."
