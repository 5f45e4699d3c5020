"""What the package's arming .pth costs every interpreter start of the environment it is installed into.

    .venv/bin/python benchmarks/startup.py [--runs 31] [--editable]

A fresh venv (no pip, no Frappe), `python -c pass` timed --runs times (after two warm-ups) before and
after installing this working tree into it (a wheel, or editable with --editable). Printed: the median
start time of each, the difference, and the interquartile ranges. A figure, no verdict: the test suite
checks what a start imports (tests/test_bootstrap.py), never how long it takes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> None:
	subprocess.run(args, check=True, capture_output=True)


def starts(python: Path, runs: int) -> list[float]:
	times = []
	for i in range(runs + 2):
		start = time.perf_counter()
		subprocess.run([str(python), "-c", "pass"], check=True)
		if i >= 2:  # the first two warm the page cache
			times.append((time.perf_counter() - start) * 1000)
	return times


def describe(times: list[float]) -> str:
	q1, median, q3 = statistics.quantiles(times, n=4)
	return f"median {median:.1f} ms (IQR {q1:.1f}-{q3:.1f}, {len(times)} runs)"


def main() -> None:
	parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
	parser.add_argument("--runs", type=int, default=31)
	parser.add_argument("--editable", action="store_true")
	args = parser.parse_args()
	with tempfile.TemporaryDirectory() as tmp:
		venv = Path(tmp, "venv")
		run(sys.executable, "-m", "venv", "--without-pip", str(venv))
		python = venv / "bin" / "python"
		plain = starts(python, args.runs)
		if args.editable:
			target = ["-e", str(ROOT)]
		else:
			run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(ROOT))
			target = [str(next(Path(tmp).glob("frappe_pgpool-*.whl")))]
		run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", *target)
		armed = starts(python, args.runs)
	how = "editable" if args.editable else "wheel"
	print(f"python -c pass, Python {sys.version.split()[0]}, {how} install")
	print(f"  without the .pth: {describe(plain)}")
	print(f"  with the .pth:    {describe(armed)}")
	print(f"  difference of the medians: {statistics.median(armed) - statistics.median(plain):+.1f} ms")


if __name__ == "__main__":
	main()
