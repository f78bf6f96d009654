"""Results store: one JSON record per finished run, written atomically, read back for resuming.

A record is written to a temporary file and renamed into place, so a killed
sweep leaves either a complete record or none (stray ``*.tmp*`` files are
ignored and cleaned). The file name is the run's stable id. A record that does
not parse, or lacks what every record holds, is corrupt: a sweep reports it and
runs its cell again; a leaderboard refuses it, naming the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from clbench.core.errors import ClbenchError

#: What every record holds (see ``clbench.experiments.sweep.run_cell``).
RECORD_KEYS = ("id", "cell", "R", "metrics", "config", "versions", "wall_time_s", "peak_memory_mb", "parameter_count")
CELL_KEYS = ("stream", "stream_args", "strategy", "strategy_args", "seed")


def record_problem(record: Any, run_id: str) -> str | None:
    """Why ``record`` (read from ``<run_id>.json``) is not a complete record, or None if it is."""
    if not isinstance(record, dict):
        return f"it holds {json.dumps(record)[:40]} instead of a record (a JSON object)"
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        return f"it lacks {', '.join(missing)}"
    cell = record["cell"]
    if not isinstance(cell, dict) or any(k not in cell for k in CELL_KEYS):
        return "its 'cell' lacks " + ", ".join(k for k in CELL_KEYS if not isinstance(cell, dict) or k not in cell)
    if not isinstance(record["metrics"], dict) or not isinstance(record["config"], dict):
        return "its 'metrics' or 'config' is not an object"
    if record["id"] != run_id:
        return f"its id {record['id']!r} does not match its file name"
    return None


class Store:
    """A folder of ``<run id>.json`` records.

    ``create=False`` (readers: leaderboards, plots) refuses a folder that does not
    exist instead of making an empty one.
    """

    def __init__(self, root: str | os.PathLike, create: bool = True) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ClbenchError(f"store {self.root} is a file, not a folder; --store takes the folder of a sweep's "
                               "results (one JSON file per run)")
        if not create:
            if not self.root.exists():
                raise ClbenchError(f"store {self.root} does not exist; run `clbench sweep ... --store {self.root}` "
                                   "first, or check the path")
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClbenchError(f"cannot create the store folder {self.root} ({e.strerror or e}); pick a writable "
                               "path for --store") from None
        from clbench.core.io import unwritable

        problem = unwritable(self.root)
        if problem:
            raise ClbenchError(f"cannot write in the store folder {self.root} ({problem}); pick a writable path "
                               "for --store")

    def remove_partial(self) -> None:
        """Delete temporary files a killed writer left behind (call when no writer is running)."""
        for stale in self.root.glob("*.json.tmp*"):
            stale.unlink(missing_ok=True)

    def path(self, run_id: str) -> Path:
        return self.root / f"{run_id}.json"

    def __contains__(self, run_id: str) -> bool:
        return self.path(run_id).is_file()

    def ids(self) -> set[str]:
        """Ids of every record file, complete or not (see :meth:`scan`)."""
        return {p.stem for p in self.root.glob("*.json")}

    def read(self, path: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(record, None) for a complete record, (None, why) for a corrupt one."""
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, f"not valid JSON ({e})"
        except OSError as e:
            return None, f"unreadable ({e.strerror or e})"
        problem = record_problem(record, path.stem)
        return (None, problem) if problem else (record, None)

    def scan(self) -> tuple[set[str], dict[str, str]]:
        """Ids of complete records, and {path: why} for corrupt ones."""
        good, corrupt = set(), {}
        for path in sorted(self.root.glob("*.json")):
            record, problem = self.read(path)
            if problem:
                corrupt[str(path)] = problem
            else:
                good.add(path.stem)
        return good, corrupt

    def write(self, run_id: str, record: dict[str, Any]) -> None:
        """Write atomically: a temporary file, then a rename."""
        from clbench.core.engine import finite

        tmp = self.root / f"{run_id}.json.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(finite(record), f, indent=1, sort_keys=True)
        os.replace(tmp, self.path(run_id))

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record, in id order; a corrupt one is a ClbenchError naming the file."""
        for path in sorted(self.root.glob("*.json")):
            record, problem = self.read(path)
            if problem:
                raise ClbenchError(f"corrupt record {path}: {problem}; rerun the sweep that wrote it (it redoes "
                                   "corrupt runs), or delete the file")
            yield record
