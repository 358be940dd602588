"""Exceptions raised to users, and the input check that raises them."""

import torch


class MegakernelError(RuntimeError):
    """The persistent kernel could not finish: a wait gave up or a schedule could deadlock."""


class UnsupportedOpError(NotImplementedError):
    """The captured graph holds an ATen op (or a use of one) that mkcompiler cannot lower."""


class InputError(ValueError):
    """Inputs given to a compiled megakernel do not match the ones it was compiled for."""


def check_input(t, what: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """Raise TypeError/InputError naming `what`, the expected and the given fact, or return."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor of shape {shape} and dtype {dtype}, got {type(t).__name__}")
    got = tuple(t.shape)
    if len(got) != len(shape):
        raise InputError(f"{what}: expected rank {len(shape)} (shape {shape}), got rank {len(got)} (shape {got})")
    if got != shape:
        raise InputError(
            f"{what}: expected shape {shape}, got {got} "
            "(a megakernel is compiled for one shape; compile another for a new shape)"
        )
    if t.dtype != dtype:
        raise InputError(f"{what}: expected dtype {dtype}, got {t.dtype}")
    if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
        raise InputError(f"{what}: expected a tensor on {device}, got one on {t.device}")
    if not t.is_contiguous():
        # A silent copy would hide a per-call cost and break in-place updates of the input.
        raise InputError(
            f"{what}: expected a contiguous tensor, got strides {tuple(t.stride())} for shape {got}; pass .contiguous()"
        )
