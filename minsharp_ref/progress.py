"""Live progress on stderr (``rich.progress``), drawn only when stderr is an interactive
terminal with colours allowed; nothing at all otherwise (CI logs, pipes, ``--quiet``,
``NO_COLOR``, ``TERM=dumb``).

A command opens one ``Phases`` display and adds one bar per phase that takes time: an
indeterminate one (``total=None``: starting a Dask cluster, reading the model and the
data, the solver) or a counted one (samples, trials) that shows done/total, the rate, the
elapsed and the remaining time, and stays on screen at its final count when done. A phase
started with ``keep_after`` stays on screen only if it took at least that many seconds
(the solver: shown while it runs, kept only when it was slow).
"""

from __future__ import annotations

import os
import sys
from typing import IO, Optional

from rich.console import Console
from rich.progress import (BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn)
from rich.table import Column
from rich.text import Text


def interactive(stream: IO) -> bool:
    """Whether ``stream`` is a terminal that may receive colours and cursor movement: a TTY,
    ``TERM`` not ``dumb`` and ``NO_COLOR`` unset or empty (https://no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb" \
        and not os.environ.get("NO_COLOR")


#: seconds after which a ``maybe_slow`` phase keeps its line on screen
SLOW_PHASE = 1.0


class _Count(ProgressColumn):
    """``done/total unit`` (blank for an indeterminate phase, which has no unit)."""

    def render(self, task: Task) -> Text:
        if not task.fields["unit"]:
            return Text("")
        total = "" if task.total is None else f"/{int(task.total)}"
        return Text(f"{int(task.completed)}{total} {task.fields['unit']}", style="progress.download")


class _Rate(ProgressColumn):
    """Units per second: the recent rate while running, the overall rate when finished."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not task.fields["unit"] or speed is None:
            return Text("")
        return Text(f"{speed:,.0f} {task.fields['unit']}/s", style="progress.data.speed")


class _Remaining(ProgressColumn):
    """Estimated time left, ``h:mm:ss left`` (``-:--:--`` until a rate is known)."""

    def render(self, task: Task) -> Text:
        if not task.fields["unit"] or task.total is None:
            return Text("")
        left = task.time_remaining
        if left is None:
            return Text("-:--:-- left", style="progress.remaining")
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours:d}:{minutes:02d}:{seconds:02d} left", style="progress.remaining")


class Phases:
    """A context manager drawing one progress bar per phase on ``console`` (default: a
    console on stderr), or nothing when ``enabled`` is false or the console is not
    interactive. Use ``start(description, total, unit)`` then ``advance(n)``; ``done()``
    completes the current phase (a new ``start`` does it too)."""

    def __init__(self, enabled: bool = True, console: Optional[Console] = None):
        if console is None and enabled and interactive(sys.stderr):
            console = Console(file=sys.stderr, force_terminal=True, highlight=False)
        self._progress = Progress(
            TextColumn("{task.description:<8}"), BarColumn(),
            _Count(table_column=Column(no_wrap=True)), _Rate(table_column=Column(no_wrap=True)),
            TimeElapsedColumn(), _Remaining(table_column=Column(no_wrap=True)),
            console=console, transient=False,
            redirect_stdout=False, redirect_stderr=False) if enabled and console else None
        self._task: Optional[TaskID] = None
        self._keep_after: Optional[float] = None

    def __enter__(self) -> "Phases":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            if exc[0] is None:
                self.done()
            self._progress.stop()

    def start(self, description: str, total: Optional[int] = None, unit: str = "",
              keep_after: Optional[float] = None) -> None:
        """Complete the current phase and start the next one (``keep_after``: see above)."""
        self.done()
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total, unit=unit)
            self._keep_after = keep_after

    def maybe_slow(self, description: str) -> None:
        """Start an indeterminate phase that stays on screen only if it takes SLOW_PHASE
        seconds or more (``api.score``'s ``on_phase``: the solver)."""
        self.start(description, keep_after=SLOW_PHASE)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, refresh=True)

    def done(self) -> None:
        """Complete the current phase: a counted bar ends at what was counted (its total
        when everything was processed), an indeterminate one fills."""
        if self._progress is None or self._task is None:
            return
        task = next(t for t in self._progress.tasks if t.id == self._task)
        if self._keep_after is not None and (task.elapsed or 0.0) < self._keep_after:
            self._progress.remove_task(self._task)  # fast: not worth a line on screen
            self._progress.refresh()
        else:
            total = task.completed if task.total is not None else 1
            self._progress.update(self._task, total=total, completed=total, refresh=True)
            self._progress.stop_task(self._task)
        self._task = None

    def samples(self, description: str = "scoring"):
        """Callbacks for ``api.score``: ``(on_start, progress)``. ``on_start(total)`` ends the
        current phase and starts a counted one in samples; ``progress(n)`` advances it."""
        return (lambda total: self.start(description, total, "samples")), self.advance
