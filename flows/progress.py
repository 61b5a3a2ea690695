"""What ``llmpipe run`` shows on a terminal while it works: one live display of the pipeline's stages.

The stage wrappers (``flows/steps.py``) report to a process-wide display: a stage started, advanced (training's
``on_progress``: step, total, loss, tokens per second) and finished. By default nothing listens: a worker, CI or
a Python caller gets Prefect's log lines only. ``llmpipe run`` on a terminal turns on :func:`live`, a rich display
with a row per stage: the one running with its step out of the total, loss, tokens per second and the time left;
the ones done with their times (or ``reused``). While it runs, Prefect's console log lines are printed above it
instead of through it, so they never tear it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("llmpipe")

# Tasks shown as one stage: the tokenize plan and shards belong to "tokenize" (the task that packs the tokens).
GROUPS = {"tokenize-plan": "tokenize", "tokenize-shard": "tokenize"}


class Display:
    """Where stages report; this one ignores everything (no terminal, or a caller that wants only logs)."""

    def started(self, stage: str) -> None:
        pass

    def advanced(self, stage: str, step: int, total: int, row: dict[str, float]) -> None:
        pass

    def finished(self, stage: str, ok: bool, reused: bool = False) -> None:
        pass


_NOTHING = Display()
_display: Display = _NOTHING


def current() -> Display:
    return _display


def stage_started(task: str) -> None:
    _report("started", task)


def stage_advanced(task: str, step: int, total: int, row: dict[str, float]) -> None:
    _report("advanced", task, step, total, row)


def stage_finished(task: str, ok: bool, reused: bool = False) -> None:
    _report("finished", task, ok, reused)


def _report(event: str, task: str, *args: Any) -> None:
    display = _display
    if display is _NOTHING:
        return
    try:
        getattr(display, event)(task, *args)
    except Exception as exc:  # the display is for people; never fail a stage over it
        log.debug("progress display: %s(%s) failed: %s", event, task, exc)


@contextlib.contextmanager
def stage(task: str) -> Iterator[None]:
    """Show ``task`` as running for the duration of the block (a step of the CLI's own, not a Prefect task)."""
    stage_started(task)
    try:
        yield
    except BaseException:
        stage_finished(task, ok=False)
        raise
    stage_finished(task, ok=True)


# ---------------------------------------------------------------------------------------------- the live display


def duration(seconds: float) -> str:
    """``4.2s``, ``3:07``, ``1:02:03``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def rate(per_s: float) -> str:
    return f"{per_s / 1e6:.1f}M" if per_s >= 1e6 else f"{per_s / 1e3:.1f}k" if per_s >= 1e3 else f"{per_s:.0f}"


@dataclass
class StageState:
    name: str
    started: float
    running: int = 0  # tasks of the stage running now (the tokenize shards run side by side)
    attempts: int = 0
    ended: float | None = None
    state: str = "running"  # running | done | reused | failed
    step: int = 0
    total: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    first: tuple[float, int] | None = None  # (time, step) of the first progress report
    last: tuple[float, int] | None = None  # (time, step) of the latest one
    spinner: Any = field(default=None, repr=False)

    def elapsed(self, now: float) -> float:
        return (self.ended or now) - self.started

    def time_left(self, now: float) -> float | None:
        """Seconds until the last step, at the pace measured since the first report (since the stage started,
        while there is only one), counting down between reports."""
        if self.total is None or self.last is None or self.first is None:
            return None
        (t0, s0), (t1, s1) = self.first, self.last
        if s1 > s0:
            pace = (t1 - t0) / (s1 - s0)
        elif s1 > 0:
            pace = (t1 - self.started) / s1
        else:
            return None
        return max(0.0, (self.total - s1) * pace - (now - t1))


class LiveDisplay(Display):
    """A rich ``Live`` display of every stage seen so far, in the order they started."""

    def __init__(self, console: Any, title: str, min_refresh_s: float = 0.05):
        from rich.live import Live

        self.console, self.title = console, title
        self.started_at = time.monotonic()
        self.stages: dict[str, StageState] = {}
        self.lock = threading.Lock()
        self.min_refresh_s, self._refreshed = min_refresh_s, 0.0
        self.live = Live(console=console, get_renderable=self.render, refresh_per_second=4, transient=False,
                         redirect_stdout=True, redirect_stderr=True)

    # -- events (from any thread)

    def started(self, task: str) -> None:
        from rich.spinner import Spinner

        name = GROUPS.get(task, task)
        with self.lock:
            st = self.stages.get(name)
            if st is None or st.state in ("done", "reused"):
                st = self.stages[name] = StageState(name, time.monotonic(), spinner=Spinner("dots", style="cyan"))
            if st.running == 0 and name == task:
                st.attempts += 1  # the stage's own task, or a retry of it: its pace is measured afresh
                st.first = st.last = None
            st.running += 1
            st.state, st.ended = "running", None

    def advanced(self, task: str, step: int, total: int, row: dict[str, float]) -> None:
        name = GROUPS.get(task, task)
        now = time.monotonic()
        with self.lock:
            st = self.stages.get(name)
            if st is None:
                return
            if st.first is None or step < st.last[1]:  # the first report, or a resumed attempt
                st.first = (now, step)
            st.last = (now, step)
            st.step, st.total = step, total
            st.loss, st.tokens_per_s = row.get("loss"), row.get("tokens_per_s")
            due = step >= total or now - self._refreshed >= self.min_refresh_s
            if due:
                self._refreshed = now
        if due:  # every report shows (at most 20 a second), not only the next timed refresh
            self.live.refresh()

    def finished(self, task: str, ok: bool, reused: bool = False) -> None:
        name = GROUPS.get(task, task)
        with self.lock:
            st = self.stages.get(name)
            if st is None:
                return
            st.running = max(0, st.running - 1)
            if not ok:
                st.state, st.ended = "failed", time.monotonic()
            elif name == task:  # the stage's own task ends it; a plan or a shard does not
                st.state, st.ended = ("reused" if reused else "done"), time.monotonic()
        self.live.refresh()

    # -- drawing

    def render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        grid = Table.grid(padding=(0, 1))
        # Fixed widths: the columns do not move as the numbers in them change. Narrower than 105 columns (an
        # 80-column terminal) the bar goes, so the numbers and the time left still fit.
        wide = self.console.size.width >= 105
        columns = [{"width": 1}, {"width": 19}, *([{"width": 20}] if wide else []), {"width": 44 if wide else 40},
                   {"width": 17, "justify": "right"}]
        for column in columns:
            grid.add_column(no_wrap=True, overflow="ellipsis", **column)

        def add_row(status: Any, name: Any, bar: Any, detail: Any, when: Any) -> None:
            grid.add_row(status, name, *([bar] if wide else []), detail, when)

        with self.lock:
            stages = list(self.stages.values())
        done = sum(st.state in ("done", "reused") for st in stages)
        add_row("", Text(self.title, style="bold"), "",
                     Text(f"{done} stage{'' if done == 1 else 's'} done", style="dim"),
                     Text(duration(now - self.started_at), style="bold"))
        room = max(3, self.console.size.height - 3)  # taller than the terminal, a live display cannot redraw
        if len(stages) > room:
            hidden = {id(st) for st in [st for st in stages if st.state != "running"][: len(stages) - room + 1]}
            stages = [st for st in stages if id(st) not in hidden]
            add_row("", Text(f"... {len(hidden)} earlier", style="dim"), "", "", "")
        for st in stages:
            training = st.total is not None
            if st.state == "running":
                status: Any = st.spinner
                bar: Any = ProgressBar(total=st.total, completed=st.step, width=20) if training else ""
                detail = Text()
                if training:
                    detail.append(f"step {st.step}/{st.total}")
                    if st.loss is not None:
                        detail.append(f"  loss {st.loss:.4f}")
                    if st.tokens_per_s:
                        detail.append(f"  {rate(st.tokens_per_s)} tok/s")
                if st.attempts > 1:
                    detail.append(f"  attempt {st.attempts}", style="yellow")
                left = st.time_left(now)
                when = Text(duration(st.elapsed(now)) + (f", {duration(left)} left" if left is not None else ""))
            else:
                status = Text("✗", style="red") if st.state == "failed" else Text("✓", style="green")
                bar = ""
                detail = Text({"failed": "failed", "reused": "reused"}.get(st.state, ""),
                              style="red" if st.state == "failed" else "dim")
                if training and st.state == "done":
                    detail.append(f"{st.step} steps" + (f", final loss {st.loss:.4f}" if st.loss is not None else ""),
                                  style="dim")
                when = Text(duration(st.elapsed(now)), style="dim")
            add_row(status, Text(st.name), bar, detail, when)
        return grid

    def __enter__(self) -> LiveDisplay:
        self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.stop()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


@contextlib.contextmanager
def _log_lines_above(console: Any) -> Iterator[None]:
    """Send the log handlers that write to a terminal through ``console``, whose lines the live display prints
    above itself: Prefect's console handlers, and plain stream handlers (their stream becomes the display's
    stand-in for ``sys.stderr``). Put back as they were afterwards."""
    try:
        from prefect.logging.handlers import PrefectConsoleHandler
    except ImportError:  # pragma: no cover - prefect is a dependency
        PrefectConsoleHandler = ()  # noqa: N806
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    changed: list[tuple[logging.Handler, str, Any]] = []
    seen: set[int] = set()
    for lg in loggers:
        for handler in list(lg.handlers):
            if id(handler) in seen or not _is_terminal(getattr(handler, "stream", None)):
                continue
            seen.add(id(handler))
            if isinstance(handler, PrefectConsoleHandler):
                changed.append((handler, "console", handler.console))
                handler.console = console
            elif isinstance(handler, logging.StreamHandler):
                changed.append((handler, "stream", handler.stream))
                handler.setStream(sys.stderr)  # the live display's proxy: lines go above it
    try:
        yield
    finally:
        for handler, attr, old in reversed(changed):
            if attr == "console":
                handler.console = old
            else:
                handler.setStream(old)


@contextlib.contextmanager
def live(title: str, file: Any = None) -> Iterator[LiveDisplay]:
    """Show the live display on ``file`` (a terminal; default stdout) while the block runs, with every stage that
    reports in it; afterwards it stays on the screen as it last looked."""
    global _display
    from rich.console import Console

    # No markup or highlighting: log lines printed above the display are shown as they are.
    console = Console(file=file or sys.stdout, markup=False, highlight=False, emoji=False)
    display = LiveDisplay(console, title)
    with display, _log_lines_above(console):
        previous, _display = _display, display
        try:
            yield display
        finally:
            _display = previous


@contextlib.contextmanager
def rows_bar(total: int, what: str, file: Any = None) -> Iterator[Any]:
    """A bar of rows done out of ``total`` on a terminal (``file``; default stderr, so that stdout stays the
    command's output), with rows per second and the time left. Yields the callback to give rows done to."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(file=file or sys.stderr, markup=False, highlight=False, emoji=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(what, total=total, rate="")
        started = time.monotonic()

        def advance(done: int) -> None:
            rate = done / max(time.monotonic() - started, 1e-9)
            progress.update(task, completed=done, rate=f"{rate:,.0f} rows/s")

        yield advance
