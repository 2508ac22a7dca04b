"""Progress of the long commands: a rich bar on a terminal, plain lines elsewhere.

``Progress`` counts work items (explore's schedules, sweep's runs) with a known total:
on a terminal a rich bar with the count, the rate, the ETA and the violations (or failed
runs) found so far; when stderr is not a terminal (a log, CI, a pipe) one plain line at
every tenth of the total and a last line at the end, so logs stay readable. ``watch``
follows one long run (``kmm run`` of a big program, ``kmm replay`` of a long trace): on a
terminal a bar of emulated events (or a counter when the total is not known), drawn from
a thread that only reads the scheduler's event count, so the run itself, its schedule
and its trace are the same with or without it; off a terminal it prints nothing.

Rates and ETAs are wall-clock figures: they go to stderr only, never into a report or a
file a command writes.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """``done`` of ``total`` items, their rate, ETA and ``found`` (violations or failed
    runs) on ``stream`` (stderr): a rich bar when it is a terminal (or ``console`` is a
    rich Console, e.g. one with force_terminal=True in a test), else a plain line at
    every tenth of the total. ``enabled=False`` shows nothing."""

    def __init__(self, total: int, stream=None, enabled: bool = True, *,
                 what: str = "explore", unit: str = "schedule", found: str = "violation",
                 console=None) -> None:
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.what, self.unit, self.found_word = what, unit, found
        self.t0 = time.perf_counter()
        self.next_mark = max(self.total // 10, 1)
        self.bar = None
        self.closed = False
        self.printed: tuple[int, int] | None = None  # the last plain line's figures
        isatty = getattr(self.stream, "isatty", lambda: False)
        if enabled and (console is not None or isatty()):
            self._start_bar(console)

    def _start_bar(self, console) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar,
                                   TextColumn, TimeRemainingColumn)
        console = console or Console(file=self.stream)
        self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(),
                       MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                       TextColumn("ETA"), TimeRemainingColumn(),
                       TextColumn("{task.fields[found]}"),
                       console=console, transient=False, refresh_per_second=5)
        self.task = self.bar.add_task(self.what, total=self.total or None,
                                      rate="", found="")
        self.bar.start()

    def line(self, done: int, found: int, final: bool = False) -> str:
        """The plain line: ``explore: 40/400 schedules, 12.3 schedules/s, 0 violations``
        (with the ETA until the end)."""
        elapsed = time.perf_counter() - self.t0
        rate = done / max(elapsed, 1e-9)
        text = (f"{self.what}: {done}/{self.total} {self.unit}s, {rate:.1f} {self.unit}s/s, "
                f"{_plural(found, self.found_word)}")
        if not final and 0 < done < self.total:
            text += f", ETA {_eta((self.total - done) / max(rate, 1e-9))}"
        return text

    def update(self, done: int, found: int, final: bool = False) -> None:
        if not self.enabled or self.closed:
            return
        if self.bar is not None:
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=done, rate=f"{rate:.1f} {self.unit}s/s",
                            found=_plural(found, self.found_word))
            if final:
                self.close()
            return
        if (final and self.printed != (done, found)) or done >= self.next_mark:
            while self.next_mark <= done:
                self.next_mark += max(self.total // 10, 1)
            self.stream.write(self.line(done, found, final) + "\n")
            self.stream.flush()
            self.printed = (done, found)
        if final:
            self.closed = True

    def close(self) -> None:
        """Stop the bar (also on an interruption: the terminal is left clean)."""
        if self.bar is not None and not self.closed:
            self.bar.stop()
        self.closed = True


# ------------------------------------------------------------------- one long run
_machines: list = []


def _seen(m) -> None:
    """kmm.tools.runner's machine hook: the machine a watched command builds."""
    _machines.append(m)


@contextlib.contextmanager
def watch(what: str, total_events: int | None = None, *, stream=None, console=None,
          delay: float = 1.0, interval: float = 0.2):
    """Follow the machine(s) the body builds (kmm.tools.runner.build_machine): on a
    terminal, once the run has taken ``delay`` seconds, a transient bar of emulated
    events (of ``total_events`` when known, e.g. a replayed failure's recorded count)
    with the rate, the ETA and the emulated time. Off a terminal: nothing."""
    from kmm.tools import runner
    stream = stream or sys.stderr
    if console is None and not getattr(stream, "isatty", lambda: False)():
        yield None
        return
    _machines.clear()
    runner.MACHINE_HOOKS.append(_seen)
    stop = threading.Event()
    drawn: dict = {}
    t0 = time.perf_counter()

    def draw() -> None:
        sched = _machines[-1].sched
        if "bar" not in drawn:
            drawn["bar"], drawn["task"] = _event_bar(what, total_events, stream, console)
        rate = sched.seq / max(time.perf_counter() - t0, 1e-9)
        drawn["bar"].update(drawn["task"], completed=sched.seq,
                            rate=f"{rate:,.0f} events/s, {sched.now / 1e6:.3f} ms emulated")

    def poll() -> None:
        while not stop.wait(interval):
            if _machines and time.perf_counter() - t0 >= delay:
                draw()

    thread = threading.Thread(target=poll, name="kmm-progress", daemon=True)
    thread.start()
    try:
        yield drawn
    finally:
        stop.set()
        thread.join()
        runner.MACHINE_HOOKS.remove(_seen)
        if delay <= 0 and _machines:  # asked to show at once: the last state at least
            draw()
        _machines.clear()
        if "bar" in drawn:
            drawn["bar"].stop()


def _event_bar(what: str, total: int | None, stream, console):
    from rich.console import Console
    from rich.progress import (BarColumn, Progress as Bar, SpinnerColumn, TextColumn,
                               TimeRemainingColumn)
    console = console or Console(file=stream)
    cols = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.completed:,} events"), TextColumn("{task.fields[rate]}")]
    if total:
        cols += [TextColumn("ETA"), TimeRemainingColumn()]
    bar = Bar(*cols, console=console, transient=True, refresh_per_second=5)
    task = bar.add_task(what, total=total or None, rate="")
    bar.start()
    return bar, task
