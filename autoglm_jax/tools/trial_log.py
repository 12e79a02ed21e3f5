"""The autotuner's trial log: one JSON line per finished trial, so an interrupted run resumes.

Owns: appending trials durably (flush + fsync per line) and reading them back. The first line records
the search space, objective and strategy; resuming with different ones is an error (the old trials
would not mean the same). A last line cut off by an interruption is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int
    params: dict[str, Any]
    status: str                      # "ok" | "failed"
    result: dict[str, Any] | None    # metrics (None when failed)
    value: float                     # Objective.search_value (what strategies maximise)
    feasible: bool
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TrialLog:
    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = os.fspath(path)
        self.header = json.loads(json.dumps(header))  # normalised as it will read back

    def load(self) -> list[Trial]:
        """Trials already in the file (creating it with the header if absent)."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            self._append({"header": self.header})
            return []
        with open(self.path) as f:
            lines = f.read().splitlines()
        records = []
        for number, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number != len(lines) - 1:
                    raise ValueError(f"{self.path}: line {number + 1} is not JSON") from None
                log.warning("%s: ignoring a cut-off last line (interrupted run)", self.path)
        if not records or "header" not in records[0]:
            raise ValueError(f"{self.path}: not a trial log (no header line)")
        if records[0]["header"] != self.header:
            raise ValueError(f"{self.path} was written for a different search space/objective/strategy:\n"
                             f"  file: {records[0]['header']}\n  now:  {self.header}\n"
                             "use another --log file or delete this one")
        if lines and not _ends_with_newline(self.path):
            with open(self.path, "a") as f:  # drop the cut-off line's tail so the next append starts clean
                f.write("\n")
        return [Trial(**r) for r in records[1:]]

    def append(self, trial: Trial) -> None:
        self._append(trial.to_dict())

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
