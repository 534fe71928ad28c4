"""Where a durable daemon's time goes under the bench load: py-spy samples, summarized.

    python -m bench.profile [--seconds 8] [--db memory|durable]

Starts the daemon and one load generator (as the cost bench does), samples the daemon with
py-spy (`pip install py-spy`; needs ptrace rights on the process), writes the raw stacks and a
flame graph to bench/out/, and prints the share of samples per leaf function and per thread,
and the inclusive share of limiterd's own functions.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cost import ENV, ROOT, server

OUT = Path(__file__).resolve().parent / "out"


def summarize(raw: str, top: int = 15) -> list[str]:
    """py-spy `--format raw --threads` lines ("thread;frame;...;leaf COUNT") as a report."""
    total, leaf, incl, threads = 0, collections.Counter[str](), collections.Counter[str](), \
        collections.Counter[str]()
    for line in raw.splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        total += n
        frames = stack.split(";")
        threads[re.sub(r"\s*\(\w+\)", "", frames[0])] += n
        leaf[frames[-1]] += n
        for f in {re.sub(r":\d+\)", ")", f) for f in frames[1:]}:
            if "limiterd/" in f and "__main__" not in f and "cli.py" not in f:
                incl[f] += n
    if not total:
        return ["no samples"]

    def pct(c: collections.Counter[str], k: int) -> list[str]:
        return [f"  {100 * v / total:5.1f}%  {name}" for name, v in c.most_common(k)]

    return [f"{total} samples", "threads:", *pct(threads, 5), "leaf frames (self time):",
            *pct(leaf, top), "limiterd functions (inclusive):", *pct(incl, top)]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--db", choices=("memory", "durable"), default="durable")
    a = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    OUT.mkdir(exist_ok=True)
    raw_path, svg_path = OUT / f"profile-{a.db}.txt", OUT / f"profile-{a.db}.svg"
    with tempfile.TemporaryDirectory() as tmp, server(a.db, Path(tmp)) as s:
        gen = subprocess.Popen(
            [sys.executable, "-m", "bench.load", s.target, "32", str(a.seconds + 4), "1"],
            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)  # past the generator's warm-up
        pid, dur = str(s.proc.pid), str(max(1, int(a.seconds)))
        subprocess.run([spy, "record", "--pid", pid, "--duration", dur, "--rate", "200",
                        "--threads", "--format", "raw", "-o", str(raw_path)], check=True)
        subprocess.run([spy, "record", "--pid", pid, "--duration", "2", "--rate", "200",
                        "-o", str(svg_path)], check=True)
        print("load:", gen.communicate()[0].strip())
    print("\n".join(summarize(raw_path.read_text())))
    print(f"raw stacks: {raw_path}\nflame graph: {svg_path}")


if __name__ == "__main__":
    main()
