#!/usr/bin/env python3
"""Before and after: one benchmark command against two source trees, alternating.

Runs the command given after ``--`` ``--runs`` times for each tree, base and head in turn
(base, head, base, head, ...), so a drift of the machine's speed hits both alike. Each run sees
only its own tree's package: ``PYTHONPATH`` is set to that tree's source folder alone, which
comes before the virtual environment's editable install of callboard, and before the first run
the harness imports ``callboard`` the way the command will (same interpreter, environment and
folder) and stops unless it comes from that tree.

    git worktree add ../base <the commit before>      # once
    python bench/compare.py --base ../base/src --head src --runs 3 -- \\
        python bench/run.py --no-anchor --seconds 10 --rounds 1
    python bench/compare.py --base ../base --head . -- python bench/throughput.py --rounds 1
    python bench/compare.py --base ../base --head . -- python bench/latency.py

``--base`` and ``--head`` each name a source folder (the one holding ``callboard/``) or a
repository (the one holding ``src/callboard/``). The command runs in the current folder for
both trees, so both run the same benchmark scripts and only the package differs; with
``--own-bench`` it runs in each tree's repository instead, so each runs its own scripts. A
leading ``python`` or ``python3`` in the command is this interpreter.

It prints each run's figures and, per figure, the median of each side and the ratio head/base
of the medians and the median of the ratios of each base-head pair. The figures are read from
what ``bench/run.py``, ``bench/throughput.py`` and ``bench/latency.py`` print (found by the
script's name in the command); ``--metric NAME=REGEX`` reads others (the regex's first group,
or its groups ``value`` and, to tell several matches apart, ``label``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NUMBER = r"([\d,]+(?:\.\d+)?)"


@dataclass(frozen=True)
class Metric:
    """A figure read from the benchmark's output; ``lower`` when smaller is better."""

    name: str
    pattern: re.Pattern[str]
    lower: bool = False


def metric(name: str, pattern: str, *, lower: bool = False) -> Metric:
    return Metric(name, re.compile(pattern, re.MULTILINE), lower)


# What each benchmark prints (its Markdown table and summary lines).
PRESETS: dict[str, list[Metric]] = {
    "run.py": [
        metric("callboard req/s", rf"^\| callboard \| {NUMBER} \|"),
        metric(
            "callboard p99 ms", rf"^\| callboard \| [\d,.]+ \| [\d.]+ \| {NUMBER} \|", lower=True
        ),
        metric("bare route req/s", rf"^\| starlette \| {NUMBER} \|"),
        metric("callboard / bare route %", r"^callboard / bare starlette: (\d+)%"),
        metric(
            "CPU µs per request", r"^callboard CPU per accepted request .*: (\d+) µs", lower=True
        ),
    ],
    "throughput.py": [
        metric("drained/s", r"^\| (?P<label>[\w+-]+) \| (?P<value>[\d,]+) \| [\d,]+ \|"),
        metric("published/s", r"^\| (?P<label>[\w+-]+) \| [\d,]+ \| (?P<value>[\d,]+) \|"),
    ],
    "latency.py": [
        metric(
            "p50 ms",
            r"^\| (?P<label>[\w+-]+) \| \d+ \| \d+ \| (?P<value>[\d.]+) \|",
            lower=True,
        ),
        metric(
            "p99 ms",
            r"^\| (?P<label>[\w+-]+) \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \| (?P<value>[\d.]+) \|",
            lower=True,
        ),
    ],
}


@dataclass(frozen=True)
class Tree:
    """One side of the comparison: its source folder and its repository."""

    name: str
    src: Path
    root: Path


def tree(name: str, given: str) -> Tree:
    path = Path(given).resolve()
    if (path / "callboard" / "__init__.py").is_file():
        return Tree(name, path, path.parent)
    if (path / "src" / "callboard" / "__init__.py").is_file():
        return Tree(name, path / "src", path)
    raise SystemExit(f"--{name} {given}: neither callboard/ nor src/callboard/ is in it")


def environment(side: Tree) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(side.src)}


def check_import(side: Tree, python: str, cwd: Path) -> Path:
    """Where ``import callboard`` finds the package for this side; stop unless in its tree."""
    found = subprocess.run(
        [python, "-c", "import callboard; print(callboard.__file__)"],
        env=environment(side),
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if found.returncode:
        raise SystemExit(f"{side.name}: import callboard failed:\n{found.stderr}")
    module = Path(found.stdout.strip()).resolve()
    if not module.is_relative_to(side.src):
        raise SystemExit(f"{side.name}: callboard comes from {module}, not from {side.src}")
    return module


def read(metrics: list[Metric], output: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    for m in metrics:
        for match in m.pattern.finditer(output):
            groups = match.groupdict()
            value = groups.get("value") or match.group(1)
            label = groups.get("label")
            figures[f"{label} {m.name}" if label else m.name] = float(value.replace(",", ""))
    return figures


def run_once(side: Tree, command: list[str], cwd: Path) -> str:
    done = subprocess.run(
        command, env=environment(side), cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(
            f"{side.name}: {' '.join(command)} exited with {done.returncode}\n"
            f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def parse_metric(text: str) -> Metric:
    name, sep, pattern = text.partition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError("--metric takes NAME=REGEX")
    return metric(name, pattern)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="source folder or repository (before)")
    parser.add_argument("--head", default="src", help="source folder or repository (after)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side")
    parser.add_argument(
        "--own-bench", action="store_true", help="run each side's own benchmark scripts"
    )
    parser.add_argument("--metric", type=parse_metric, action="append", default=[])
    parser.add_argument("--show-output", action="store_true", help="print each run's output")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the benchmark command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    if command[0] in ("python", "python3"):
        command = [sys.executable, *command[1:]]
    metrics: list[Metric] = list(args.metric)
    for script, preset in PRESETS.items():
        if any(Path(word).name == script for word in command):
            metrics += preset
    if not metrics:
        parser.error(
            "no figures to read: name bench/run.py, throughput.py or latency.py, or --metric"
        )

    sides = [tree("base", args.base), tree("head", args.head)]
    here = Path.cwd()
    for side in sides:
        cwd = side.root if args.own_bench else here
        print(f"{side.name}: callboard from {check_import(side, command[0], cwd)} (run in {cwd})")
    print(f"command: {' '.join(command)}\n")

    figures: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
    for n in range(1, args.runs + 1):
        for side in sides:
            output = run_once(side, command, side.root if args.own_bench else here)
            if args.show_output:
                print(output)
            found = read(metrics, output)
            if not found:
                raise SystemExit(f"{side.name}: no figure found in the output:\n{output}")
            figures[side.name].append(found)
            shown = "; ".join(f"{k} {v:,g}" for k, v in found.items())
            print(f"run {n} {side.name}: {shown}", flush=True)

    lower = {m.name for m in metrics if m.lower}
    names = [k for k in figures["head"][0] if all(k in f for f in figures["base"])]
    print("\n| figure | base median | head median | head/base (medians) | median of pair ratios |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        base = [f[name] for f in figures["base"] if name in f]
        head = [f[name] for f in figures["head"] if name in f]
        pairs = [h / b for b, h in zip(base, head, strict=False) if b]
        ratio = statistics.median(head) / statistics.median(base) if statistics.median(base) else 0
        better = " (lower is better)" if any(name.endswith(m) for m in lower) else ""
        print(
            f"| {name}{better} | {statistics.median(base):,g} | {statistics.median(head):,g} | "
            f"{ratio:.3f} | {statistics.median(pairs) if pairs else float('nan'):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
