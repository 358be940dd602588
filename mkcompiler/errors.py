"""Exceptions raised to users."""


class MegakernelError(RuntimeError):
    """The persistent kernel could not finish: a wait gave up or a schedule could deadlock."""


class UnsupportedOpError(NotImplementedError):
    """The captured graph holds an ATen op (or a use of one) that mkcompiler cannot lower."""


class InputError(ValueError):
    """Inputs given to a compiled megakernel do not match the ones it was compiled for."""
