"""A one-line compile progress report on stderr: the current step and the time so far.

Nothing is shown for compiles that end within `delay` seconds, nor when stderr is not a
terminal (logs, CI, pytest) or the `progress` setting is off. A background thread redraws
the line twice a second, so a long step (capture, build_dag) still shows its time growing.
"""

from __future__ import annotations

import sys
import threading
import time

DELAY_S = 2.0


class Progress:
    def __init__(self, enabled: bool = True, stream=None, delay: float = DELAY_S, interval: float = 0.5):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled and isatty is not None and isatty())
        self.delay, self.interval = delay, interval
        self.start = time.perf_counter()
        self.step_name = "starting"
        self.shown = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="mkcompiler-progress", daemon=True)
            self._thread.start()

    def step(self, name: str) -> None:
        self.step_name = name
        if self.enabled and time.perf_counter() - self.start >= self.delay:
            self._draw()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            if time.perf_counter() - self.start >= self.delay:
                self._draw()

    def _draw(self, final: str | None = None) -> None:
        with self._lock:
            text = final or f"mkcompiler: {self.step_name} ... {time.perf_counter() - self.start:.1f} s"
            self.stream.write("\r\x1b[K" + text + ("\n" if final else ""))
            self.stream.flush()
            self.shown = True

    def close(self, summary: str = "compiled") -> None:
        """Stop; if the line was shown, replace it with `summary` and the total time."""
        if not self.enabled or self._done.is_set():
            return
        self._done.set()
        self._thread.join()
        if self.shown:
            self._draw(f"mkcompiler: {summary} in {time.perf_counter() - self.start:.1f} s")
