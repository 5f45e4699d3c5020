"""Plots for the end-to-end reports, from their JSON: e2e.png and distance.png.

python benchmarks/plot.py [results dir]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"


def e2e(rows: list[dict], path: Path) -> None:
	endpoints = sorted({r["endpoint"] for r in rows}, reverse=True)
	fig, axes = plt.subplots(2, len(endpoints), figsize=(10, 7))
	for col, endpoint in enumerate(endpoints):
		for pool, style in (("off", "o--"), ("on", "o-")):
			mine = [r for r in rows if r["endpoint"] == endpoint and r["pool"] == pool]
			c = [r["concurrency"] for r in mine]
			axes[0][col].plot(c, [r["p95"] for r in mine], style, label=f"p95, pool {pool}")
			axes[0][col].plot(c, [r["p50"] for r in mine], style, alpha=0.4, label=f"p50, pool {pool}")
			axes[1][col].plot(c, [r["rps"] for r in mine], style, label=f"pool {pool}")
		axes[0][col].set_title(endpoint)
		axes[0][col].set_ylabel("latency ms")
		axes[1][col].set_ylabel("requests/s")
		axes[1][col].set_xlabel("concurrent clients")
		for ax in (axes[0][col], axes[1][col]):
			ax.set_ylim(bottom=0)
			ax.legend(fontsize=8)
	fig.suptitle("Frappe 15 through pgBouncer (SCRAM): pool off vs on")
	fig.tight_layout()
	fig.savefig(path, dpi=100)


def distance(rows: list[dict], path: Path) -> None:
	placements = list(dict.fromkeys(r["placement"] for r in rows))
	endpoints = sorted({r["endpoint"] for r in rows}, reverse=True)
	fig, axes = plt.subplots(1, len(endpoints), figsize=(10, 4))
	width = 0.38
	for col, endpoint in enumerate(endpoints):
		ax = axes[col]
		for i, pool in enumerate(("off", "on")):
			values = [
				next(
					r["p50"]
					for r in rows
					if r["placement"] == p and r["endpoint"] == endpoint and r["pool"] == pool
				)
				for p in placements
			]
			ax.bar(
				[x + (i - 0.5) * width for x in range(len(placements))], values, width, label=f"pool {pool}"
			)
		ax.set_xticks(range(len(placements)), placements, fontsize=8)
		ax.set_title(f"{endpoint}: p50 latency by distance to pgBouncer")
		ax.set_ylabel("ms")
		ax.legend()
	fig.tight_layout()
	fig.savefig(path, dpi=100)


def main() -> int:
	out = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
	for name, draw in (("e2e", e2e), ("e2e-gthread", e2e), ("distance", distance)):
		source = out / f"{name}.json"
		if source.exists():
			draw(json.loads(source.read_text()), out / f"{name}.png")
			print(f"wrote {out / name}.png")
	return 0


if __name__ == "__main__":
	raise SystemExit(main())
