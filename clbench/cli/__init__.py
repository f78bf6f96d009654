"""The command line: `clbench COMMAND ...` (see `clbench --help`)."""
from clbench.cli.commands import main

__all__ = ["main"]
