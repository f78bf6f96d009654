"""Reproductions: one module per paper, each a short script of named experiments plus its report.

``clbench reproduce PAPER [--quick] [--output DIR]`` runs one and writes DIR/README.md with its figures.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

from clbench.core.errors import ClbenchError

PAPERS = {"hiratani2024": "clbench.reproduce.hiratani2024"}


def reproduce(paper: str, output: str | os.PathLike, quick: bool = False,
              progress: Callable[[str], None] | None = None) -> Path:
    """Run ``paper``'s reproduction at the quick or full size; returns the path of the written report."""
    if paper not in PAPERS:
        raise ClbenchError(f"unknown paper {paper!r}; choose one of {', '.join(sorted(PAPERS))}")
    return importlib.import_module(PAPERS[paper]).reproduce(output, quick=quick, progress=progress)


__all__ = ["PAPERS", "reproduce"]
