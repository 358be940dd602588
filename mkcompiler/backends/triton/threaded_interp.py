"""Run the Triton interpreter's programs concurrently, one Python thread per program.

Triton 3.6's interpreter runs a grid's programs one after another, so a static per-worker
schedule never really runs in parallel there and a wait on a later program's work never
ends. With `threaded()` every program is a thread: static schedules run concurrently on the
CPU and a bad schedule really deadlocks (and is caught by the bounded waits).

    with mkcompiler.backends.triton.threaded_interp.threaded():
        out = mk(x)

`launch_together` runs several launches at once that way (the ranks of a tensor-parallel group).

This patches Triton internals (triton.runtime.interpreter), so it is pinned to triton 3.6:
- the only per-program state, `interpreter_builder.grid_idx`, becomes thread-local;
- `GridExecutor.__call__` starts one thread per program and joins them all;
- `InterpretedFunction.rewrite` (a check-then-fill cache) takes a lock;
- atomics and volatile loads give up the GIL afterwards (time.sleep(0)), so a spinning waiter
  polls once and lets the program it waits for run, instead of burning its whole switch interval.
Each program's tensors are its own numpy arrays; shared memory is only touched through
the interpreter's loads, stores and (real, C++) atomics.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time

import triton

SUPPORTED = "3.6"

_tls = threading.local()
_lock = threading.Lock()  # guards enable/disable
_rewrite_lock = threading.RLock()
_saved: dict | None = None  # originals while enabled


def _run_all(threads: list[threading.Thread]) -> None:
    """Start every program's thread, then wait for all (every program runs at once)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _check_version() -> None:
    if not triton.__version__.startswith(SUPPORTED):
        raise RuntimeError(
            f"mkcompiler.backends.triton.threaded_interp patches the internals of triton {SUPPORTED}.x's interpreter; "
            f"this is triton {triton.__version__}. Check triton/runtime/interpreter.py (GridExecutor.__call__, "
            "InterpreterBuilder.grid_idx) and update the patch and SUPPORTED."
        )


def _interp():
    import triton.runtime.interpreter as interp

    return interp


def _get_grid_idx(self):
    return getattr(_tls, "grid_idx", None)


def _set_grid_idx(self, value):
    _tls.grid_idx = value


def _threaded_grid_call(self, *args_dev, **kwargs):
    """GridExecutor.__call__ of triton 3.6 with the program loop replaced by one thread each."""
    interp = _interp()
    argspec = inspect.getfullargspec(self.fn)
    kwargs = {k: v for k, v in kwargs.items() if k in argspec.args}
    args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
    for hook in self.pre_run_hooks:
        hook(*args_hst, **kwargs_hst)
    patch_scope = interp._patch_lang(self.fn)
    try:
        args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
        args = {name: arg if name in self.constexprs else interp._implicit_cvt(arg) for name, arg in args.items()}
        grid = self.grid(args) if callable(self.grid) else self.grid
        assert len(grid) <= 3, "grid must have at most 3 dimensions"
        grid = tuple(grid) + (1,) * (3 - len(grid))
        interp.interpreter_builder.set_grid_dim(*grid)
        errors: list[BaseException] = []

        def program(x, y, z):
            try:
                interp.interpreter_builder.set_grid_idx(x, y, z)
                self.fn(**args)
            except BaseException as e:  # re-raised in the launching thread below
                errors.append(e)

        # Daemon threads: a kernel that truly hangs must not keep the process alive.
        threads = [
            threading.Thread(target=program, args=(x, y, z), name=f"triton-program-{x}-{y}-{z}", daemon=True)
            for x in range(grid[0])
            for y in range(grid[1])
            for z in range(grid[2])
        ]
        _run_all(threads)
        if errors:
            if triton.knobs.compilation.front_end_debugging:
                raise errors[0]
            raise interp.InterpreterError(repr(errors[0])) from errors[0]
    finally:
        patch_scope.restore()
    self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)


def launch_together(launches) -> None:
    """Run several interpreted kernel launches at once, every program of every launch a thread
    (the ranks of a tensor-parallel group, whose programs wait on each other's counters).
    `launches`: (kernel, grid, args, kwargs), kernel an interpreted @triton.jit function, as
    kernel[grid](*args, **kwargs) would be called; the grids must be equal (the interpreter's
    grid size is global). Call it with no other interpreted launch running."""
    interp = _interp()
    grids = {tuple(grid) + (1,) * (3 - len(grid)) for _, grid, _, _ in launches}
    if len(grids) != 1:
        raise ValueError(f"launch_together needs one grid for every launch, got {sorted(grids)}")
    grid = grids.pop()
    with threaded():
        runs = []
        for kernel, _, args, kwargs in launches:
            ex = interp.GridExecutor(kernel.rewrite(), kernel.arg_names, grid)
            kwargs = {k: v for k, v in kwargs.items() if k in inspect.getfullargspec(ex.fn).args}
            args_hst, kwargs_hst = ex._init_args_hst(args, kwargs)
            call = inspect.getcallargs(ex.fn, *args_hst, **kwargs_hst)
            call = {n: a if n in ex.constexprs else interp._implicit_cvt(a) for n, a in call.items()}
            runs.append((ex, args, kwargs, args_hst, kwargs_hst, call))
        patch_scope = interp._patch_lang(runs[0][0].fn)
        errors: list[BaseException] = []

        def program(ex, call, x, y, z):
            try:
                interp.interpreter_builder.set_grid_idx(x, y, z)
                ex.fn(**call)
            except BaseException as e:  # re-raised in the launching thread below
                errors.append(e)

        try:
            interp.interpreter_builder.set_grid_dim(*grid)
            threads = [
                threading.Thread(target=program, args=(ex, call, x, y, z), name=f"triton-{i}-{x}", daemon=True)
                for i, (ex, *_, call) in enumerate(runs)
                for x in range(grid[0])
                for y in range(grid[1])
                for z in range(grid[2])
            ]
            _run_all(threads)
        finally:
            patch_scope.restore()
        for ex, args, kwargs, args_hst, kwargs_hst, _ in runs:
            ex._restore_args_dev(args, args_hst, kwargs, kwargs_hst)
        if errors:
            raise interp.InterpreterError(repr(errors[0])) from errors[0]


def _locked_rewrite(original):
    def rewrite(self):
        with _rewrite_lock:
            return original(self)

    return rewrite


def _yielding(original):
    """An atomic, then let another thread have the GIL (spinning waiters poll once and step aside)."""

    def atomic(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        time.sleep(0)
        return out

    return atomic


def _yielding_if_volatile(original, volatile_arg: int):
    """A load, then, if it is volatile (a wait's poll), let another thread have the GIL: a waiter
    polling with volatile loads would otherwise use up its switch intervals, and its bounded
    wait could give up while the program it waits for had no time to run."""

    def load(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if kwargs.get("is_volatile", args[volatile_arg] if len(args) > volatile_arg else False):
            time.sleep(0)
        return out

    return load


def enabled() -> bool:
    return _saved is not None


def enable() -> None:
    """Patch the interpreter to run one thread per program (idempotent)."""
    global _saved
    _check_version()
    interp = _interp()
    with _lock:
        if _saved is not None:
            return
        builder, grid, fn = interp.InterpreterBuilder, interp.GridExecutor, interp.InterpretedFunction
        _saved = {
            (builder, "grid_idx"): builder.__dict__.get("grid_idx"),
            (builder, "create_atomic_rmw"): builder.create_atomic_rmw,
            (builder, "create_atomic_cas"): builder.create_atomic_cas,
            (builder, "create_load"): builder.create_load,
            (builder, "create_masked_load"): builder.create_masked_load,
            (grid, "__call__"): grid.__call__,
            (fn, "rewrite"): fn.rewrite,
        }
        current = getattr(interp.interpreter_builder, "grid_idx", None)
        builder.grid_idx = property(_get_grid_idx, _set_grid_idx)
        _tls.grid_idx = current
        builder.create_atomic_rmw = _yielding(builder.create_atomic_rmw)
        builder.create_atomic_cas = _yielding(builder.create_atomic_cas)
        builder.create_load = _yielding_if_volatile(builder.create_load, 3)  # (ptr, _, _, is_volatile)
        builder.create_masked_load = _yielding_if_volatile(builder.create_masked_load, 5)
        grid.__call__ = _threaded_grid_call
        fn.rewrite = _locked_rewrite(fn.rewrite)


def disable() -> None:
    """Undo enable() (idempotent)."""
    global _saved
    with _lock:
        if _saved is None:
            return
        for (cls, name), original in _saved.items():
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)
        _saved = None


@contextlib.contextmanager
def threaded():
    """Run interpreted kernel launches inside the block with one thread per program."""
    was_enabled = enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()
