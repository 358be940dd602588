"""A speed-up for Triton 3.6's interpreter (CPU runs only; never used on a GPU).

Every call of a @triton.jit helper inside an interpreted kernel re-patches triton.language
(hundreds of setattr calls) and restores it afterwards: about 40% of an interpreted
megakernel step, whose tile routines are all helper calls. Patching `tl` and `tl.core` once,
at the kernel launch, and skipping the nested re-patching gives the same semantics (all our
device code reaches the language through those two modules). Pinned to 3.6: other versions
are left alone.
"""

from __future__ import annotations

import threading
import types

import triton
import triton.language as tl

_state = threading.local()
_installed = False


def install() -> bool:
    """Install once; returns whether it is active (False on other Triton versions)."""
    global _installed
    if _installed:
        return True
    if not triton.__version__.startswith("3.6"):
        return False
    import triton.runtime.interpreter as interp

    original = interp._patch_lang
    both = types.FunctionType((lambda: None).__code__, {"tl": tl, "core": tl.core})
    lock = threading.Lock()
    active = [0]  # launches in progress (the threaded interpreter runs programs of one launch)

    def patch_lang(fn):
        with lock:
            if active[0]:  # a nested helper call: the launch already patched tl and tl.core
                return interp._LangPatchScope()
            scope = original(both)
            active[0] += 1
        restore = scope.restore

        def restore_once():
            with lock:
                active[0] -= 1
                restore()

        scope.restore = restore_once
        return scope

    interp._patch_lang = patch_lang
    _installed = True
    return True
