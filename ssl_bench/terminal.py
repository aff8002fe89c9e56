"""What the command line shows while it works: progress bars, message levels and the log file.

Progress: library code reports through a ``progress(iterable, desc=..., total=..., unit=..., step=...)``
callback (``step(item)``: how many units an item is, e.g. the images of a batch). ``Display.progress``
draws it as a bar with its unit, its total where known and the time left, and removes the bar when the
stage is done, so a sweep shows its overall bar (``Display.overall``: cells done of all, time left) and
the stage running now, never a stack of finished bars. Executors that run cells elsewhere (Ray) only call
``advance`` on the overall bar.

Levels: ``-q`` shows results, warnings and errors only (no bars, no plan, no per-cell lines); ``-v`` adds
details (e.g. the traceback of a failed cell, through the ``ssl_bench`` logger). ``--log-file`` gets all
of it except the bars, without colours.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

QUIET, NORMAL, VERBOSE = 0, 1, 2
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
log = logging.getLogger("ssl_bench")


class _Tee(io.TextIOBase):
    """Writes to the current ``sys.stdout``/``sys.stderr`` (looked up on every write, so a redirection made
    later applies) and, without colour codes, to the log file when there is one."""

    def __init__(self, stream: str, log_file: Callable[[], TextIO | None]):
        self._stream, self._log_file = stream, log_file

    @property
    def stream(self) -> TextIO:
        return getattr(sys, self._stream)

    def write(self, text: str) -> int:
        self.stream.write(text)
        if (target := self._log_file()) is not None:
            target.write(_ANSI.sub("", text))
            target.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


class _Amount(ProgressColumn):
    """``37/101 images``, or ``37 images`` while the total is unknown."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "")
        done = int(task.completed)
        text = f"{done}/{int(task.total)}" if task.total is not None else f"{done}"
        return Text(f"{text} {unit}".strip(), style="progress.download")


class Display:
    """The command line's outputs: results (stdout), messages (stderr), bars, log file; one per process."""

    def __init__(self):
        self.level = NORMAL
        self.log_file: TextIO | None = None
        self.out = Console(file=_Tee("stdout", lambda: self.log_file), soft_wrap=True, markup=False,
                           highlight=False)  # our text has brackets ([missing: key]), never markup
        self.err = Console(file=_Tee("stderr", lambda: self.log_file), highlight=False, soft_wrap=True)
        self.bars_console = Console(stderr=True)  # never teed: a log file gets no bar redraws

    def configure(self, level: int, log_path=None) -> None:
        self.level = level
        for handler in list(log.handlers):  # configured once per command; a second call starts afresh
            log.removeHandler(handler)
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        handlers: list[logging.Handler] = []
        if level >= VERBOSE:
            handlers.append(logging.StreamHandler(self.err.file))
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 -- open for the whole command
            self.log_file.write(f"\n=== ssl-bench {' '.join(sys.argv[1:])}\n")
            if level < VERBOSE:  # the log gets details -v would show; the console does not
                detail = logging.StreamHandler(self.log_file)
                handlers.append(detail)
        for handler in handlers:
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
        log.setLevel(logging.DEBUG if handlers else logging.WARNING)
        log.propagate = False

    def info(self, text: str) -> None:
        """A progress message (plan, per-cell lines): hidden by -q."""
        if self.level > QUIET:
            self.out.print(text)

    def result(self, text) -> None:
        """What the command was run for: always shown."""
        self.out.print(text)

    @contextmanager
    def bars(self) -> Iterator["Bars"]:
        enabled = self.level > QUIET and self.bars_console.is_terminal  # a pipe or a file gets no bars
        with Progress(TextColumn("{task.description}"), BarColumn(), _Amount(), TimeElapsedColumn(),
                      TextColumn("left"), TimeRemainingColumn(), console=self.bars_console, transient=True,
                      disable=not enabled) as progress:
            yield Bars(progress)


class Bars:
    def __init__(self, progress: Progress):
        self._progress = progress

    def progress(self, iterable: Iterable, desc: str = "", total: int | None = None, unit: str = "steps",
                 step: Callable[[object], int] | None = None):
        """A stage's bar while it runs (removed once it is done: the overall bar and the next stage stay)."""
        task = self._progress.add_task(escape(desc), total=total, unit=unit)
        try:
            for item in iterable:
                yield item
                self._progress.advance(task, step(item) if step else 1)
        finally:
            self._progress.remove_task(task)

    def overall(self, total: int, desc: str = "sweep", unit: str = "cells") -> Callable[[int], None]:
        """The whole sweep's bar (cells done of all, time left); returns ``advance(n=1)``."""
        task = self._progress.add_task(f"[bold]{escape(desc)}", total=total, unit=unit)
        return lambda n=1: self._progress.advance(task, n)

    __call__ = progress  # a Bars object is itself a progress callback
