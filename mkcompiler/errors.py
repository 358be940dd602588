"""Exceptions raised to users, and the input check that raises them."""

import torch
import torch.utils._pytree as pytree


class MegakernelError(RuntimeError):
    """The persistent kernel could not finish: a wait gave up or a schedule could deadlock."""


class UnsupportedOpError(NotImplementedError):
    """The captured graph holds an ATen op (or a use of one) that mkcompiler cannot lower."""


class ModelError(ValueError):
    """The model cannot be compiled as it is (weights on several devices, a forward that changes Python
    attributes, dropout in training mode, example inputs that require grad in training mode): the
    message names the parameter, module, attribute or op, and what to change."""


class MissingExtraError(ModuleNotFoundError):
    """An optional package that one feature needs is not installed; the message names the extra
    (pyproject.toml's optional-dependencies) that installs it."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(
            f'{feature} need {package}, which is not installed: pip install "mkcompiler[{extra}]" '
            f"(or pip install {package})",
            name=package,
        )


class InputError(ValueError):
    """Inputs given to a compiled megakernel do not match the ones it was compiled for."""


class InputTypeError(InputError, TypeError):
    """An input is not a tensor, or the call's arguments are not structured like the example inputs.
    Both a TypeError (what Python raises for a wrong type) and an InputError (one family to catch)."""


def describe(x) -> str:
    """What was passed, in a few words, for messages: 'list of 2048 items', 'float 2.5',
    'numpy.ndarray of shape (3, 16) and dtype float32', 'Tensor of shape (3, 16) and dtype torch.float32'."""
    if isinstance(x, torch.Tensor):
        return f"Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy arrays and other array types
        kind = f"{type(x).__module__.split('.')[0]}.{type(x).__name__}"
        return f"{kind} of shape {tuple(x.shape)} and dtype {x.dtype} (convert it with torch.as_tensor)"
    if isinstance(x, (list, tuple, dict)):
        n = len(x)
        return f"{type(x).__name__} of {n} item{'' if n == 1 else 's'}"
    if isinstance(x, (bool, int, float, complex, str)) or x is None:
        text = repr(x)
        return f"{type(x).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
    return type(x).__name__


def pytree_children(spec) -> list:
    return spec.children() if hasattr(spec, "children") else spec.children_specs  # torch < 2.7 has no children()


def flatten_call(args: tuple, kwargs: dict, spec, names: list[str]) -> list:
    """The call's inputs as flat leaves, in the order of the example inputs (whose pytree structure,
    (args, kwargs), is `spec`); raise InputError unless the call is structured exactly like them.
    A leaf is returned whatever it is (check_input checks it), so a list where a tensor was expected
    is reported as such instead of being flattened into its items."""
    args_spec, kwargs_spec = pytree_children(spec)
    if len(args) != args_spec.num_children:
        given = "; ".join(describe(a) for a in args[:4]) + ("; ..." if len(args) > 4 else "")
        raise InputError(
            f"expected {len(names)} tensor inputs ({', '.join(names)}) as {args_spec.num_children} positional "
            f"arguments, got {len(args)}"
            + (f": {given}" if args else "")
            + (f" (and keyword arguments {sorted(kwargs)})" if kwargs else "")
        )
    leaves: list = []
    for k, (a, s) in enumerate(zip(args, pytree_children(args_spec))):
        _flatten_up_to(a, s, f"argument {k}", leaves)
    _flatten_up_to(dict(kwargs), kwargs_spec, "keyword arguments", leaves)
    return leaves


def _flatten_up_to(x, spec, where: str, leaves: list) -> None:
    if spec.is_leaf():
        leaves.append(x)
        return
    if type(x) is not spec.type:
        raise InputTypeError(
            f"{where}: expected a {spec.type.__name__} like the example inputs' ({spec}), got {describe(x)}"
        )
    if spec.type is dict:  # keys in the example's order, whatever the call's order
        if set(x) != set(spec.context):
            raise InputError(f"{where}: expected keys {list(spec.context)}, got {list(x)}")
        keys, children = list(spec.context), [x[key] for key in spec.context]
    else:
        children, context = pytree.SUPPORTED_NODES[spec.type].flatten_fn(x)
        if len(children) != spec.num_children or context != spec.context:
            raise InputError(f"{where}: expected {spec.num_children} items ({spec}), got {describe(x)}")
        keys = list(range(len(children)))
    for key, c, s in zip(keys, children, pytree_children(spec)):
        _flatten_up_to(c, s, f"{where}[{key!r}]", leaves)


def check_input(t, what: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """Raise InputTypeError/InputError naming `what`, the expected and the given fact, or return."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{what}: expected a torch.Tensor of shape {shape} and dtype {dtype}, got {describe(t)}")
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
