"""mkcompiler: compile a PyTorch model into one persistent Triton megakernel.

mk = mkcompiler.compile(model, example_inputs)
out = mk(*inputs)          # same outputs as model(*inputs)
mk.source, mk.queue, mk.dag
"""

import os as _os

# In a source checkout ops/ and passes/ sit beside this package; installed, they live
# inside it (pyproject maps them to mkcompiler.ops / mkcompiler.passes).
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "ops")) and _os.path.isdir(_os.path.join(_root, "ops")):
    __path__.append(_root)  # noqa: F821


def _default_interpret() -> None:
    """With no GPU, run kernels in Triton's interpreter (it must be chosen before @triton.jit runs)."""
    if "TRITON_INTERPRET" not in _os.environ:
        import torch

        if not torch.cuda.is_available():
            _os.environ["TRITON_INTERPRET"] = "1"


_default_interpret()
if _os.environ.get("TRITON_INTERPRET") == "1":
    from mkcompiler.backends.triton import interp_patches as _interp_patches

    _interp_patches.install()

from mkcompiler import dynamo as _dynamo  # noqa: E402
from mkcompiler.api import compile  # noqa: E402
from mkcompiler.errors import InputError, MegakernelError, ModelError, UnsupportedOpError  # noqa: E402
from mkcompiler.ir.settings import Settings  # noqa: E402
from mkcompiler.runtime.megakernel import Megakernel  # noqa: E402

_dynamo.register()  # torch.compile(backend="mkcompiler"); torch._dynamo itself is imported only when used

__all__ = ["compile", "Megakernel", "MegakernelError", "UnsupportedOpError", "InputError", "ModelError", "Settings"]
