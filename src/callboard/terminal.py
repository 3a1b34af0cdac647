"""What the command line shows of long work: a progress bar on a terminal, plain lines otherwise.

``rich`` draws the bar, on standard error, when standard error is a terminal; piped or captured,
the same progress comes out as a line every ``LINE_EVERY`` items and one at the end, which logs
and scripts read well.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

#: Items between two plain progress lines.
LINE_EVERY = 1_000


class Progress:
    """Told ``(done, total)`` as work goes (``total`` ``None`` when not known)."""

    def __init__(self, what: str, stream: TextIO) -> None:
        self.what = what
        self.stream = stream
        self.done = 0
        self._reported = 0

    def __call__(self, done: int, total: int | None) -> None:
        self.done = done
        if done - self._reported >= LINE_EVERY:
            self._reported = done
            of = f" of {total}" if total is not None else ""
            print(f"{self.what}: {done}{of}", file=self.stream, flush=True)

    def finish(self) -> None:
        if self.done and self.done != self._reported:
            print(f"{self.what}: {self.done} done", file=self.stream, flush=True)


class _Bar(Progress):
    def __init__(self, what: str, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn
        from rich.progress import Progress as RichProgress

        super().__init__(what, stream)
        self._bar = RichProgress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(file=stream),
            transient=True,
        )
        self._task = self._bar.add_task(what, total=None)
        self._bar.start()

    def __call__(self, done: int, total: int | None) -> None:
        self.done = done
        self._bar.update(self._task, completed=done, total=total)

    def finish(self) -> None:
        self._bar.stop()


@contextmanager
def progress(what: str, stream: TextIO | None = None) -> Iterator[Progress]:
    """A progress display for ``what`` (``"replaying"``) on ``stream`` (standard error)."""
    out = sys.stderr if stream is None else stream
    shown = _Bar(what, out) if out.isatty() else Progress(what, out)
    try:
        yield shown
    finally:
        shown.finish()
