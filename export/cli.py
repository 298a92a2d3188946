"""``sparsemm-export``: ONNX engine folder (placeholder until the export issue lands)."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="tiny", show_default=True, help="model to export (tiny, name or path)")
@click.option("--out", type=click.Path(file_okay=False), help="engine folder to write")
def export_cli(model: str, out: str | None) -> None:
    """Export MODEL with the SparseMM ragged-KV attention as an ONNX engine folder.

    Not implemented yet in this version: the command exists so the entry point is installed and tested.
    """
    raise click.UsageError("sparsemm-export is not implemented yet in this version")


def main() -> None:
    export_cli.main(prog_name="sparsemm-export")
