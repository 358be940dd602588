"""Per-instruction profiles: who ran what, when, and how long it waited.

A profile is one row per instruction: (worker, fetch, ready, end) stamps, where `fetch` is when
the worker took the instruction, `ready` when its waits were met and `end` after its signal.
The GPU kernel stamps with %globaltimer (ns); the interpreter with a shared atomic tick counter
(a logical clock: order, not duration); the VM with time.perf_counter_ns(). Rows of
instructions that never ran hold -1.

    prof = mk.profile(x)            # or profile_vm(mk, x): the reference VM, host clock
    prof.trace("trace.json")        # Chrome / Perfetto trace: one track per worker (SM)
    prof.gantt("gantt.png")         # one row per worker, one colour per op kind
    print(prof.summary(bandwidth=3.35e12, flops=989e12))

Bytes and FLOPs per instruction (`instruction_work`) are the op families' own `work` (ops/base.py),
the same figures the scheduler's cost model uses.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from mkcompiler.errors import MissingExtraError
from mkcompiler.ir.layout import NUM_STAMPS, Field, StampField
from mkcompiler.ir.queue import Queue
from mkcompiler.ops.registry import FAMILIES

WORKER, FETCH, READY, END = StampField  # Profile.stamps' columns (ir/layout.py)
HATCH_LIMIT = 2000  # Gantt charts hatch wait bars up to this many


# ---- bytes and FLOPs of each instruction ----


def instruction_work(compilation, queue: Queue | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bytes[n], flops[n]) per instruction of `queue` (default: the compilation's): the op
    families' own `work` (what the cost model schedules by), peer bytes counted with the rest.
    FLOPs count matmul (2 M N K) and attention (2 x query-key pairs x (d_qk + d_v)) only."""
    queue = compilation.queue if queue is None else queue
    graph, dag = compilation.graph, compilation.dag
    n = len(queue)
    nbytes, flops = np.zeros(n), np.zeros(n)
    for i, t in enumerate(queue.rows[:, Field.TASK].tolist()):
        task = dag.tasks[t]
        op = graph.ops[task.op]
        work = FAMILIES[op.kind].work(op, task.coords)
        nbytes[i], flops[i] = work.bytes + work.peer_bytes, work.flops
    return nbytes, flops


# ---- formatting ----


def _fmt_time(x: float, unit: str) -> str:
    if unit == "tick":
        return f"{x:,.0f} tick{'s' if x != 1 else ''}"
    for scale, name in ((1e9, "s"), (1e6, "ms"), (1e3, "us")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {name}"
    return f"{x:.0f} ns"


def _fmt_si(x: float, suffix: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{suffix}"
    return f"{x:.3g} {suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [str(v).ljust(w) if c == 0 else str(v).rjust(w) for c, (v, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


@dataclass
class _Timeline:
    """What Profile.summary's sections read: per instruction, whether it ran (ok), its worker and
    its times relative to the earliest fetch (Profile._times); the span; the unit."""

    ok: np.ndarray
    worker: np.ndarray
    fetch: np.ndarray
    ready: np.ndarray
    end: np.ndarray
    span: float
    unit: str

    @property
    def timed(self) -> bool:
        """Real durations (not the interpreter's logical ticks): rates make sense."""
        return self.unit == "ns"

    @property
    def busy(self) -> np.ndarray:
        return self.end - self.ready

    @property
    def wait(self) -> np.ndarray:
        return self.ready - self.fetch

    @property
    def workers(self) -> list[int]:
        return sorted(set(self.worker[self.ok].tolist()))


def _rate(amount: float, ns: float, suffix: str) -> str:
    return _fmt_si(amount / (ns * 1e-9) if ns else 0.0, suffix)


def _kind_row(t: _Timeline, kind: str, sel, work, total_busy: float, bandwidth, flops) -> list[str]:
    """Profile.summary's row of one op kind: its instructions `sel` and their (bytes, FLOPs)
    `work`; busy time, its share of `total_busy`, wall span and, when timed, rates over both."""
    busy, wall = float(t.busy[sel].sum()), float(t.end[sel].max() - t.ready[sel].min())
    nbytes, nflops = work
    row = [
        kind,
        str(int(sel.sum())),
        _fmt_time(busy, t.unit),
        f"{100 * busy / total_busy:.1f}%",
        _fmt_time(wall, t.unit),
    ]
    row += [_fmt_si(nbytes, "B"), _fmt_si(nflops, "FLOP") if nflops else "-"]
    if not t.timed:
        return row
    row += [_rate(nbytes, busy, "B/s"), _rate(nbytes, wall, "B/s")]
    row += [_rate(nflops, busy, "FLOP/s") if nflops else "-", _rate(nflops, wall, "FLOP/s") if nflops else "-"]
    if bandwidth:
        row.append(f"{100 * (nbytes / (wall * 1e-9) if wall else 0.0) / bandwidth:.1f}%")
    if flops:
        row.append(f"{100 * (nflops / (wall * 1e-9) if wall else 0.0) / flops:.1f}%" if nflops else "-")
    return row


def _total_row(t: _Timeline, total_busy: float, work, bandwidth, flops) -> list[str]:
    """Profile.summary's total row: all busy time, and rates over the whole span."""
    nbytes, nflops = work
    span = t.span
    row = ["total", str(int(t.ok.sum())), _fmt_time(total_busy, t.unit), "100%", _fmt_time(span, t.unit)]
    row += [_fmt_si(nbytes, "B"), _fmt_si(nflops, "FLOP") if nflops else "-"]
    if not t.timed:
        return row
    row += ["", _rate(nbytes, span, "B/s") if span else "-", ""]
    row += [_rate(nflops, span, "FLOP/s") if span and nflops else "-"]
    if bandwidth:
        row.append(f"{100 * nbytes / (span * 1e-9) / bandwidth:.1f}%" if span else "-")
    if flops:
        row.append(f"{100 * nflops / (span * 1e-9) / flops:.1f}%" if span and nflops else "-")
    return row


def _min_mean_max(x: np.ndarray, unit: str) -> str:
    return f"min {_fmt_time(x.min(), unit)}, mean {_fmt_time(x.mean(), unit)}, max {_fmt_time(x.max(), unit)}"


def _no_worker_working(t: _Timeline, t_start: float) -> str:
    """Stretches where every worker is waiting or idle: gaps in the union of busy intervals."""
    by_start = np.argsort(t.ready[t.ok], kind="stable")
    r_s, e_s = t.ready[t.ok][by_start], t.end[t.ok][by_start]
    reach = np.maximum.accumulate(e_s)
    holes = np.concatenate([[r_s[0] - t_start], np.maximum(r_s[1:] - reach[:-1], 0.0)])
    holes = holes[holes > 0]
    return (
        f"  no worker working: {_fmt_time(holes.sum(), t.unit)} ({100 * holes.sum() / (t.span or 1):.1f}% of the span) "
        f"in {len(holes)} stretches" + (f", longest {_fmt_time(holes.max(), t.unit)}" if len(holes) else "")
    )


# ---- the profile ----


@dataclass
class Profile:
    queue: Queue
    stamps: np.ndarray  # int64 [n_instructions, NUM_STAMPS]
    unit: str  # "ns" (GPU globaltimer, VM clock) or "tick" (interpreter logical clock)
    source: str  # "gpu", "interpreter" or "vm"
    device_name: str = ""
    compilation: object | None = None  # passes.pipeline.Compilation (graph and DAG for bytes/FLOPs)
    # Gluon backend: per instruction, when its loader issued the first weight block (same clock as
    # the stamps; -1: nothing streamed). None for backends without a loader.
    loads: np.ndarray | None = None

    # -- derived arrays --
    def ran(self) -> np.ndarray:
        """Bool per instruction: it has all four stamps (instructions that never ran hold -1)."""
        s = np.asarray(self.stamps)
        return (s >= 0).all(axis=1)

    def missing(self) -> list[int]:
        return np.nonzero(~self.ran())[0].tolist()

    def kinds(self) -> list[str]:
        """Op kind (family) of each instruction."""
        q = self.queue
        return [q.opcode_keys[o][0] for o in q.rows[:, Field.OPCODE].tolist()]

    def work(self) -> tuple[np.ndarray, np.ndarray]:
        """(bytes, flops) per instruction (zeros without a compilation); computed once."""
        cached = getattr(self, "_work", None)
        if cached is None:
            if self.compilation is None:
                n = len(self.queue)
                cached = (np.zeros(n), np.zeros(n))
            else:
                cached = instruction_work(self.compilation, self.queue)
            self._work = cached
        return cached

    def _times(self):
        """(ok mask, worker, fetch, ready, end, origin) with times as float64 relative to the
        earliest fetch; ready/end are clamped to be monotone (fetch <= ready <= end).

        `fetch` is when the worker starts waiting for the instruction: its fetch stamp, or its
        previous instruction's end if later. With fetch-ahead (the dynamic schedule's lookahead,
        in the kernel and the VM) a worker takes its next instruction while it still runs one, so
        raw fetch-to-ready waits overlap the work before them: shares over 100% of the span and
        negative end-to-next-fetch gaps. Clamped, a worker's waits and runs tile its time."""
        s = np.asarray(self.stamps, dtype=np.int64)
        ok = self.ran()
        origin = int(s[ok, FETCH].min()) if ok.any() else 0
        fetch = (s[:, FETCH] - origin).astype(np.float64)
        order = np.lexsort((fetch, s[:, WORKER]))
        order = order[ok[order]]
        same = s[order[1:], WORKER] == s[order[:-1], WORKER]  # consecutive instructions of one worker
        prev_end = (s[order[:-1], END] - origin).astype(np.float64)
        fetch[order[1:]] = np.where(same, np.maximum(fetch[order[1:]], prev_end), fetch[order[1:]])
        ready = np.maximum((s[:, READY] - origin).astype(np.float64), fetch)
        end = np.maximum((s[:, END] - origin).astype(np.float64), ready)
        return ok, s[:, WORKER], fetch, ready, end, origin

    def span(self) -> float:
        """First fetch to last end, in `unit`."""
        ok, _, fetch, _, end, _ = self._times()
        return float(end[ok].max() - fetch[ok].min()) if ok.any() else 0.0

    def _track_name(self, w: int) -> str:
        return f"SM {w}" if self.source == "gpu" else f"worker {w}"

    # -- Chrome / Perfetto trace --
    def trace(self, path: str, waits: bool = True) -> str:
        """Write a Chrome trace (open in ui.perfetto.dev or chrome://tracing): one track per
        worker; per instruction one complete event from ready to end named by its opcode, and
        (with `waits`) a "wait" event (category "wait") from fetch to ready when it waited.
        Times in microseconds from the earliest fetch (ticks are shown as microseconds)."""
        ok, worker, fetch, ready, end, origin = self._times()
        scale = 1e-3 if self.unit == "ns" else 1.0
        q = self.queue
        kinds = self.kinds()
        nbytes, flops = self.work()
        label = f"megakernel ({self.source}{', ' + self.device_name if self.device_name else ''})"
        events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": label}}]
        for w in sorted(set(worker[ok].tolist())):
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": w, "args": {"name": self._track_name(w)}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": w, "args": {"sort_index": w}})
        for i in np.nonzero(ok)[0].tolist():
            w = int(worker[i])
            wait = ready[i] - fetch[i]
            if waits and wait > 0:
                events.append(
                    {
                        "name": "wait",
                        "cat": "wait",
                        "ph": "X",
                        "pid": 0,
                        "tid": w,
                        "ts": round(fetch[i] * scale, 3),
                        "dur": round(wait * scale, 3),
                        "args": {"instruction": i, "waiting for": q.opcode_name(i)},
                    }
                )
            events.append(
                {
                    "name": q.opcode_name(i),
                    "cat": kinds[i],
                    "ph": "X",
                    "pid": 0,
                    "tid": w,
                    "ts": round(ready[i] * scale, 3),
                    "dur": round((end[i] - ready[i]) * scale, 3),
                    "args": {
                        "instruction": i,
                        "tile": q.descs[i],
                        "wait": round(wait * scale, 3),
                        "bytes": int(nbytes[i]),
                        "flops": float(flops[i]),
                    },
                }
            )
        doc = {
            "traceEvents": events,
            "displayTimeUnit": "ns" if self.unit == "ns" else "ms",
            "otherData": {
                "source": self.source,
                "device": self.device_name,
                "stamp_unit": self.unit if self.unit == "ns" else "tick (shown as us)",
                "origin": origin,
                "instructions": len(q),
                "missing_instructions": self.missing(),
            },
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    # -- Gantt chart --
    def gantt(self, path: str, title: str | None = None, dpi: int = 100) -> str:
        """Write a PNG Gantt chart: one row per worker, one colour per op kind, waits (fetch to
        ready) light grey and hatched. One PolyCollection per kind: fast for 10^4+ bars."""
        try:
            from matplotlib.collections import PolyCollection
            from matplotlib.figure import Figure
            from matplotlib.patches import Patch
        except ModuleNotFoundError as e:
            raise MissingExtraError("matplotlib", "profile", "Gantt charts") from e

        ok, worker, fetch, ready, end, _ = self._times()
        scale, xunit = (1e-3, "us") if self.unit == "ns" else (1.0, "ticks")
        kinds = np.array(self.kinds(), dtype=object)
        workers = sorted(set(worker[ok].tolist())) or [0]
        row = {w: k for k, w in enumerate(workers)}
        y = np.array([row.get(int(w), 0) for w in worker], dtype=np.float64)
        height = 0.8

        def boxes(sel, x0, x1):
            x0, x1, yy = x0[sel] * scale, x1[sel] * scale, y[sel]
            v = np.empty((len(x0), 4, 2))
            v[:, 0, 0] = v[:, 1, 0] = x0
            v[:, 2, 0] = v[:, 3, 0] = x1
            v[:, 0, 1] = v[:, 3, 1] = yy - height / 2
            v[:, 1, 1] = v[:, 2, 1] = yy + height / 2
            return v

        n_rows = len(workers)
        fig = Figure(figsize=(14, min(2.0 + 0.13 * n_rows, 40.0)), dpi=dpi)
        ax = fig.add_subplot()
        handles = []
        waited = ok & (ready > fetch)
        if waited.any():
            # Hatching costs seconds for 10^4 bars in Agg: beyond a few thousand, light grey only.
            hatch = "///" if waited.sum() <= HATCH_LIMIT else None
            ax.add_collection(
                PolyCollection(
                    boxes(waited, fetch, ready), facecolors="#d9d9d9", edgecolors="#a0a0a0", linewidths=0, hatch=hatch
                )
            )
            handles.append(Patch(facecolor="#d9d9d9", edgecolor="#a0a0a0", hatch=hatch, label="wait (fetch to ready)"))
        palette = [
            "#1f77b4",
            "#ff7f0e",
            "#2ca02c",
            "#d62728",
            "#9467bd",
            "#8c564b",
            "#e377c2",
            "#7f7f7f",
            "#bcbd22",
            "#17becf",
            "#393b79",
            "#637939",
        ]
        for k, kind in enumerate(sorted(set(kinds[ok].tolist()))):
            sel = ok & (kinds == kind)
            color = palette[k % len(palette)]
            ax.add_collection(PolyCollection(boxes(sel, ready, end), facecolors=color, edgecolors="none"))
            handles.append(Patch(facecolor=color, label=f"{kind} ({int(sel.sum())})"))
        x_end = float(end[ok].max() * scale) if ok.any() else 1.0
        ax.set_xlim(0, max(x_end, 1e-9) * 1.01)
        ax.set_ylim(-0.6, n_rows - 0.4)
        ax.invert_yaxis()
        step = max(1, n_rows // 40)
        ax.set_yticks(range(0, n_rows, step))
        ax.set_yticklabels([self._track_name(workers[k]) for k in range(0, n_rows, step)], fontsize=7)
        ax.set_xlabel(f"time ({xunit}) from the first fetch")
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        missing = len(self.missing())
        title = title or (
            f"megakernel profile: {int(ok.sum())} instructions on {len(workers)} workers, "
            f"total {_fmt_time(self.span(), self.unit)} ({self.source}"
            f"{', ' + self.device_name if self.device_name else ''})" + (f", {missing} never ran" if missing else "")
        )
        ax.set_title(title, fontsize=10)
        fig.subplots_adjust(left=0.07, right=0.84, top=1 - 0.4 / fig.get_figheight(), bottom=0.7 / fig.get_figheight())
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, format="png")
        return path

    # -- text summary --
    def summary(self, bandwidth: float | None = None, flops: float | None = None, top: int = 5) -> str:
        """Where the time went. `bandwidth` (bytes/s) and `flops` (FLOP/s): ceilings to compare
        achieved rates with. Busy = ready to end; wall = a kind's first ready to its last end."""
        t = self._timeline()
        lines = self._summary_head(t)
        if t.ok.any():
            lines += self._kind_section(t, bandwidth, flops)
            lines += self._worker_section(t, top)
            lines += self._gap_section(t)
            lines += self._slowest_section(t, top)
            lines += self._loader_section()
        return "\n".join(lines)

    def _loader_section(self) -> list[str]:
        """How far ahead of each streamed instruction's wait its loader asked for the weights:
        lead = ready - first block issued (> 0: the weights were on their way before the
        activations were ready, the point of a loader that never waits)."""
        if self.loads is None:
            return []
        loads = np.asarray(self.loads, dtype=np.int64)
        stamps = np.asarray(self.stamps)
        sel = (loads >= 0) & self.ran()
        if not sel.any():
            return ["", "loader: no streamed instruction ran"]
        lead = (stamps[sel, StampField.READY] - loads[sel]).astype(np.float64)
        p10, p50, p90 = np.percentile(lead, [10, 50, 90])
        unit = self.unit
        return [
            "",
            f"loader lead (ready - first weight block issued) over {int(sel.sum())} streamed instructions: "
            f"median {_fmt_time(p50, unit)}, p10 {_fmt_time(p10, unit)}, p90 {_fmt_time(p90, unit)}; "
            f"{100 * float((lead > 0).mean()):.0f}% issued before their wait ended",
        ]

    def _timeline(self) -> _Timeline:
        ok, worker, fetch, ready, end, _ = self._times()
        return _Timeline(ok, worker, fetch, ready, end, self.span(), self.unit)

    def _summary_head(self, t: _Timeline) -> list[str]:
        """What ran where over which span; what never ran."""
        q, n, workers = self.queue, len(self.queue), t.workers
        lines = [
            f"profile ({self.source}{', ' + self.device_name if self.device_name else ''}, unit {t.unit}): "
            f"{int(t.ok.sum())} of {n} instructions on {len(workers)} worker{'s' if len(workers) != 1 else ''}"
            + (f" (of {q.num_workers})" if q.num_workers != len(workers) else "")
            + ", "
            f"total span {_fmt_time(t.span, t.unit)} (first fetch to last end)"
        ]
        if t.unit == "tick":
            lines.append("  times are logical ticks of the interpreter (order, not duration): no bytes/s or FLOP/s")
        missing = self.missing()
        if missing:
            shown = ", ".join(f"{i} ({q.opcode_name(i)} {q.descs[i]})" for i in missing[:8])
            lines.append(
                f"  WARNING: {len(missing)} instructions never ran (stamps -1): {shown}{' ...' if len(missing) > 8 else ''}"
            )
        return lines

    def _kind_section(self, t: _Timeline, bandwidth: float | None, flops: float | None) -> list[str]:
        """One row per op kind (busiest first) and a total: time, bytes, FLOPs and, timed, their rates."""
        header = ["kind", "instr", "busy", "share", "wall", "bytes", "FLOPs"]
        if t.timed:
            header += ["B/s busy", "B/s wall", "FLOP/s busy", "FLOP/s wall"]
            header += (["%BW wall"] if bandwidth else []) + (["%FLOP wall"] if flops else [])
        kinds = np.array(self.kinds(), dtype=object)
        nbytes, nflops = self.work()
        ok, busy = t.ok, t.busy
        total_busy = float(busy[ok].sum()) or 1.0
        rows = []
        for kind in sorted(set(kinds[ok].tolist()), key=lambda k: -busy[ok & (kinds == k)].sum()):
            sel = ok & (kinds == kind)
            work = (float(nbytes[sel].sum()), float(nflops[sel].sum()))
            rows.append(_kind_row(t, kind, sel, work, total_busy, bandwidth, flops))
        work = (float(nbytes[ok].sum()), float(nflops[ok].sum()))
        rows.append(_total_row(t, total_busy, work, bandwidth, flops))
        lines = ["", "per op kind (busy = sum of ready->end; wall = the kind's first ready to its last end):"]
        lines += _table(header, rows)
        if t.timed:
            lines.append(
                "  B/s busy and FLOP/s busy are per worker while it runs the kind (sum / busy time); "
                "wall rates are the whole kernel's over the kind's wall span"
            )
            if bandwidth or flops:
                ceil = [_fmt_si(bandwidth, "B/s") if bandwidth else "", _fmt_si(flops, "FLOP/s") if flops else ""]
                lines.append(f"  ceilings: {' and '.join(c for c in ceil if c)}")
        comm = self.overlap()
        if comm is not None:
            lines.append(
                f"  communication: {comm['instructions']} tiles busy {_fmt_time(comm['busy'], t.unit)}, "
                f"{100 * comm['share']:.1f}% of it while other tiles ran (Profile.overlap)"
            )
        return lines

    def _worker_section(self, t: _Timeline, top: int) -> list[str]:
        """Working / waiting / idle shares of the span over the workers, and the `top` most waiting."""
        span = t.span
        stats = []  # (worker, instructions, working, waiting, idle)
        for w in t.workers:
            sel = t.ok & (t.worker == w)
            wk, wt = float(t.busy[sel].sum()), float(t.wait[sel].sum())
            stats.append((w, int(sel.sum()), wk, wt, max(0.0, span - wk - wt)))
        st = np.array([[s[2], s[3], s[4]] for s in stats]) / (span or 1.0) * 100
        lines = ["", f"per worker (share of the {_fmt_time(span, t.unit)} span; idle = not holding an instruction):"]
        lines += _table(
            ["", "min", "mean", "max"],
            [
                [name, f"{st[:, c].min():.1f}%", f"{st[:, c].mean():.1f}%", f"{st[:, c].max():.1f}%"]
                for c, name in enumerate(("working", "waiting", "idle"))
            ],
        )
        worst = sorted(stats, key=lambda s: -s[3])[:top]
        if worst and worst[0][3] > 0:
            lines.append(
                "  most waiting: "
                + "; ".join(
                    f"{self._track_name(w)} waits {100 * wt / (span or 1):.1f}%, works {100 * wk / (span or 1):.1f}% "
                    f"({cnt} instr)"
                    for w, cnt, wk, wt, _ in worst
                )
            )
        return lines

    def _gap_section(self, t: _Timeline) -> list[str]:
        """Idle time at a worker's start, between its instructions, at its end, and stretches with
        no worker working."""
        ok, worker, fetch, end, unit = t.ok, t.worker, t.fetch, t.end, t.unit
        t_start, t_end = float(fetch[ok].min()), float(end[ok].max())
        order = np.lexsort((fetch, worker))
        order = order[ok[order]]
        ws, fs, es = worker[order], fetch[order], end[order]
        same = ws[1:] == ws[:-1]  # consecutive instructions of one worker
        gaps = np.where(same, fs[1:] - es[:-1], 0.0)
        first = np.array([fetch[ok & (worker == w)].min() - t_start for w in t.workers])
        last = np.array([t_end - end[ok & (worker == w)].max() for w in t.workers])
        longest = ""
        if gaps.size and gaps.max() > 0:
            k = int(np.argmax(gaps))
            longest = f" ({self._track_name(int(ws[k]))} after instruction {int(order[k])})"
        return [
            "",
            "idle gaps:",
            f"  start (span start to a worker's first fetch): {_min_mean_max(first, unit)}",
            f"  between instructions (end to next fetch): total {_fmt_time(gaps.sum(), unit)}, "
            f"mean {_fmt_time(gaps[same].mean() if same.any() else 0.0, unit)}, "
            f"max {_fmt_time(gaps.max(initial=0.0), unit)}" + longest,
            f"  tail (a worker's last end to span end): {_min_mean_max(last, unit)}",
            _no_worker_working(t, t_start),
        ]

    def _slowest_section(self, t: _Timeline, top: int) -> list[str]:
        """The `top` instructions with the longest ready -> end."""
        q, busy = self.queue, t.busy
        idx = np.nonzero(t.ok)[0]
        slow = idx[np.argsort(-busy[idx], kind="stable")[:top]]
        lines = ["", f"slowest {len(slow)} instructions (ready->end):"]
        for i in slow.tolist():
            lines.append(
                f"  {i:>6} {self._track_name(int(t.worker[i])):<10} {q.opcode_name(i):<24} {q.descs[i]:<36} "
                f"{_fmt_time(busy[i], t.unit)}, waited {_fmt_time(t.wait[i], t.unit)}"
            )
        return lines

    def overlap(self, kinds: tuple[str, ...] | None = None) -> dict | None:
        """How much of the busy time (ready to end) of `kinds`' instructions (by default the
        communication families': OpFamily.peer_access) other kinds' instructions, on any worker,
        were busy too: {"busy": summed busy time of `kinds`, "overlapped": the part of it with
        another kind running, "share": their ratio, "instructions": how many}; None when none of
        `kinds` ran."""
        from mkcompiler.ops.registry import FAMILIES, load_all

        if kinds is None:
            load_all()
            kinds = tuple(k for k, fam in FAMILIES.items() if fam.peer_access)
        ok, _, _, ready, end, _ = self._times()
        kind = np.array(self.kinds(), dtype=object)
        mine = ok & np.isin(kind, list(kinds))
        if not mine.any():
            return None
        others = ok & ~mine
        # The others' busy intervals merged into disjoint ones, then each of ours clipped to them.
        lo, hi = ready[others], end[others]
        merged: list[list[float]] = []
        for a, b in sorted(zip(lo.tolist(), hi.tolist())):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        starts = np.array([m[0] for m in merged]) if merged else np.zeros(0)
        ends = np.array([m[1] for m in merged]) if merged else np.zeros(0)
        busy = covered = 0.0
        for a, b in zip(ready[mine].tolist(), end[mine].tolist()):
            busy += b - a
            k = np.searchsorted(ends, a, side="right")  # the first merged interval ending after a
            while k < len(starts) and starts[k] < b:
                covered += min(b, ends[k]) - max(a, starts[k])
                k += 1
        return {
            "busy": busy,
            "overlapped": covered,
            "share": covered / busy if busy else 0.0,
            "instructions": int(mine.sum()),
        }

    def __str__(self) -> str:
        return self.summary()


def profile_vm(mk, *inputs, seed: int = 0, dynamic: bool | None = None, warmup: int = 1) -> Profile:
    """Run a Megakernel's queue in the reference VM (torch references, one host thread) and
    stamp time.perf_counter_ns() at fetch, ready (chosen to run, its waits met) and end. The
    VM runs one instruction at a time: durations are the references' host time, and waits
    include the time other workers' instructions ran. `warmup` unstamped runs come first (the
    first call of a torch op is slow); they write the same buffers as the stamped run."""
    import platform

    from mkcompiler.vm import run_megakernel

    for _ in range(warmup):
        run_megakernel(mk, *inputs, seed=seed, dynamic=dynamic)

    n = len(mk.queue)
    stamps = np.full((n, NUM_STAMPS), -1, dtype=np.int64)
    column = {"fetch": FETCH, "ready": READY, "end": END}

    def observe(event: str, i: int, w: int) -> None:
        stamps[i, column[event]] = time.perf_counter_ns()
        stamps[i, WORKER] = w

    run_megakernel(mk, *inputs, seed=seed, dynamic=dynamic, observe=observe)
    device = f"reference VM on {platform.machine() or 'host'} CPU"
    return Profile(mk.queue, stamps, "ns", "vm", device_name=device, compilation=mk.compilation)
