"""What a served run cost and whether it delivered: CPU over a process tree, deliveries by id.

- ``tree_cpu(pid)``: the CPU time (user + system) of a process and of every descendant, each
  process apart, read from Linux's ``/proc``. A server with workers (``callboard serve
  --workers N``, granian) does its work in child processes, so the cost of a run is the sum over
  the tree of what each process spent between two readings (``cpu_spent``).
- ``exactly_once(directory, accepted)``: reads the ids the counting subscriber wrote
  (``bench/counter.py`` with ``BENCH_DELIVERIES``, one file per process) and says whether each
  accepted event reached the subscription once: at least as many distinct ids as accepted
  requests, and no id twice. More ids than accepted requests are events published for requests
  whose client left before the answer (at the end of wrk's run, a server may cancel such a
  request after its publish, before it counts the 202): they are shown apart, as ``extra``. The
  ids are not tied to requests, so a missing event hidden by an extra one would go unseen; with
  wrk's load the extras are a handful at the end of a run.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: One process's CPU seconds, by process id.
CpuReading = dict[int, float]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return stat[stat.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from the parent ids in ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def tree_cpu(pid: int) -> CpuReading | None:
    """CPU seconds so far of ``pid`` and of each descendant; ``None`` without ``/proc``."""
    ticks = os.sysconf("SC_CLK_TCK")
    reading: CpuReading = {}
    for member in descendants(pid):
        fields = _stat_fields(member)
        if fields is not None:
            reading[member] = (int(fields[11]) + int(fields[12])) / ticks
    return reading or None


def cpu_spent(before: CpuReading | None, after: CpuReading | None) -> float | None:
    """CPU seconds the tree spent between two readings (a process born between counts whole)."""
    if before is None or after is None:
        return None
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


@dataclass(frozen=True)
class Deliveries:
    """The counting subscription's deliveries against the requests the server accepted."""

    accepted: int
    #: Distinct event ids delivered.
    distinct: int
    #: Deliveries beyond the first of an id (an event handled twice counts one).
    repeated: int

    @property
    def missing(self) -> int:
        return max(0, self.accepted - self.distinct)

    @property
    def extra(self) -> int:
        return max(0, self.distinct - self.accepted)

    @property
    def exactly_once(self) -> bool:
        return self.accepted > 0 and self.distinct >= self.accepted and self.repeated == 0

    def summary(self) -> str:
        extra = f" (and {self.extra:,} extra)" if self.extra else ""
        if self.exactly_once:
            return f"exactly once: {self.accepted:,} of {self.accepted:,}{extra}"
        return (
            f"NOT EXACTLY ONCE: {self.distinct:,} distinct of {self.accepted:,} accepted, "
            f"{self.missing:,} missing, {self.repeated:,} delivered again{extra}"
        )


def read_deliveries(directory: Path) -> Counter[str]:
    """How many times each ``<subscription> <event id>`` was handled, over every process."""
    seen: Counter[str] = Counter()
    for path in sorted(directory.glob("*.ids")):
        with path.open() as lines:
            seen.update(line.rstrip("\n") for line in lines if line.strip())
    return seen


def exactly_once(directory: Path, accepted: int) -> Deliveries:
    seen = read_deliveries(directory)
    return Deliveries(accepted, len(seen), sum(seen.values()) - len(seen))
