"""Results store: one JSON record per finished run, written atomically, read back for resuming.

A record is written to a temporary file and renamed into place, so a killed
sweep leaves either a complete record or none (stray ``*.tmp*`` files are
ignored and cleaned). The file name is the run's stable id.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from clbench.errors import ClbenchError


class Store:
    """A folder of ``<run id>.json`` records."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def remove_partial(self) -> None:
        """Delete temporary files a killed writer left behind (call when no writer is running)."""
        for stale in self.root.glob("*.json.tmp*"):
            stale.unlink(missing_ok=True)

    def path(self, run_id: str) -> Path:
        return self.root / f"{run_id}.json"

    def __contains__(self, run_id: str) -> bool:
        return self.path(run_id).is_file()

    def ids(self) -> set[str]:
        return {p.stem for p in self.root.glob("*.json")}

    def write(self, run_id: str, record: dict[str, Any]) -> None:
        """Write atomically: a temporary file, then a rename."""
        from clbench.engine import _finite

        tmp = self.root / f"{run_id}.json.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(_finite(record), f, indent=1, sort_keys=True)
        os.replace(tmp, self.path(run_id))

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record, in id order; a corrupt one is a ClbenchError naming the file."""
        for path in sorted(self.root.glob("*.json")):
            try:
                yield json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ClbenchError(f"corrupt record {path} ({e}); delete it and rerun the sweep to redo that run") from None
