"""The click group both command lines (``sparsemm``, ``sparsemm-export``) are built on: user mistakes become one
``error: ...`` line and exit status 2, never a traceback."""

from __future__ import annotations

from typing import Any

import click

from sparsemm.errors import SparseMMError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class ReportingGroup(click.Group):
    """Turns ``SparseMMError`` into ``error: <message>`` on stderr and exit 2; Ctrl-C into ``interrupted_message``
    and exit 130."""

    interrupted_message = "interrupted"

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SparseMMError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo(self.interrupted_message, err=True)
            ctx.exit(EXIT_INTERRUPTED)
