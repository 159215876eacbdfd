"""What the commands print: the progress bar, the one-line user errors and the summary tables.

Shared by the stage commands (``cli.py``) and the store commands (``cli_store.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cospress.errors import CospressError
from cospress.redact import redact_text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second since the task started (images unless the task names its ``unit``)."""

    def render(self, task: Any) -> Text:
        speed, unit = task.finished_speed or task.speed, task.fields.get("unit", "img")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True, unit: str = "img") -> Iterator[Any]:
    """Yields ``update(done, total)``: a rich bar with ``unit``/s (rank 0 only, TTY or not), drawn from
    the first update on, so a run refused while it sets up (a setting, a store) prints one error line."""
    rank = int(os.environ.get("RANK", 0))
    if not enabled or rank != 0:
        yield lambda done, total: None
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with contextlib.ExitStack() as stack:
        shown: list[tuple[Progress, Any]] = []

        def update(done: int, total: int, **fields: Any) -> None:
            if not shown:
                bar = stack.enter_context(
                    Progress(*columns, console=console, transient=False, refresh_per_second=4)
                )
                shown.append((bar, bar.add_task(description, total=None, unit=unit)))
            bar, task = shown[0]
            bar.update(task, completed=done, total=total)

        yield update


def _fail(e: BaseException) -> None:
    """The one error line, redacted (`cospress.redact`); ``[...]`` in it is text, not rich markup."""
    console.print(f"[bold red]error:[/] {escape(redact_text(str(e)))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn CospressError (and a missing file) into a one-line message and exit code 2."""
    try:
        yield
    except CospressError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        raise typer.Exit(130) from None


def table(title: str, rows: list[tuple[str, Any]]) -> None:
    out = Table(title=title, show_header=False, title_justify="left")
    out.add_column(style="bold")
    out.add_column()
    for k, v in rows:
        out.add_row(k, escape(redact_text(str(v))))
    Console().print(out)


def job(
    name: str, show_progress: bool, work: Callable[..., Any], *args: Any, unit: str = "img", **kwargs: Any
) -> Any:
    """Run a store job with a progress bar (``unit``/s), user errors as one line."""
    with user_errors(), progress_bar(name, show_progress, unit) as update:
        return work(*args, progress=update, **kwargs)
