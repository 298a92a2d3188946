"""Progress bars for long work (rich), silent when stderr is not a terminal."""

from __future__ import annotations


class Progress:
    """A rich progress bar with ETA, advanced by ``advance(done, total)``; silent when stderr is not a TTY."""

    def __init__(self, what: str, total: int, done: int = 0):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            TextColumn(what),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.task = self.bar.add_task(what, total=total, completed=done)

    def __enter__(self):
        self.bar.start()
        return lambda done, total: self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.bar.stop()
