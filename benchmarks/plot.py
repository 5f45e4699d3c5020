"""Plots for the end-to-end reports, from their JSON: e2e.png, distance.png and sites.png.

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


def sites(data: dict, path: Path) -> None:
	"""Many sites: req/s (median of rounds) and p95 off vs on per placement and workers; servers over time."""
	rows = [r for r in data["rows"] if r.get("variant", "default") == "default"]
	merged = {
		(r["placement"], r["workers"], r["shape"], r["traffic"], r["pool"]): r
		for r in data["summary"]
		if r.get("variant", "default") == "default"
	}
	placements = list(dict.fromkeys(r["placement"] for r in rows))
	workers = list(dict.fromkeys(r["workers"] for r in rows))
	cells = list(dict.fromkeys((r["shape"], r["traffic"]) for r in rows))

	def value(metric: str, *key: str) -> float:
		return merged[key][metric] if key in merged else 0.0

	fig, axes = plt.subplots(
		len(placements),
		2 * len(workers) + 1,
		figsize=(4.2 * (2 * len(workers) + 1), 3.4 * len(placements)),
		squeeze=False,
	)
	width = 0.38
	for i, placement in enumerate(placements):
		for j, w in enumerate(workers):
			for k, (metric, label) in enumerate((("rps", "req/s"), ("p95", "p95 ms"))):
				ax = axes[i][2 * j + k]
				for n, pool in enumerate(("off", "on")):
					values = [value(metric, placement, w, shape, traffic, pool) for shape, traffic in cells]
					ax.bar(
						[x + (n - 0.5) * width for x in range(len(cells))],
						values,
						width,
						label=f"pool {pool}",
					)
				ax.set_xticks(range(len(cells)), [f"{s}\n{t}" for s, t in cells], fontsize=7)
				ax.set_title(f"{placement}, {w}: {label}", fontsize=9)
				ax.legend(fontsize=7)
		ax = axes[i][-1]  # connections to PostgreSQL over time: own sites, Zipf traffic, last round
		for w, color in zip(workers, ("tab:blue", "tab:orange"), strict=False):
			for pool, style in (("off", "--"), ("on", "-")):
				matching = [
					r
					for r in rows
					if (r["placement"], r["workers"], r["shape"], r["traffic"], r["pool"])
					== (placement, w, "own", "zipf", pool)
				]
				if not matching:
					continue
				row = matching[-1]
				# pgBouncer's servers from its log (exact), or sampled backends without pgBouncer
				points = row.get("timeline") or [[s["t"], 0, s["backends"]] for s in row["samples"]]
				ax.step(
					[p[0] for p in points],
					[p[2] for p in points],
					style,
					where="post",
					color=color,
					label=f"{w}, pool {pool}",
				)
		what = "pgBouncer servers (exact)" if placement != "direct" else "backends (sampled)"
		ax.set_title(f"{placement}: {what}, own sites, zipf", fontsize=9)
		ax.set_xlabel("s")
		ax.set_ylim(bottom=0)
		ax.legend(fontsize=7)
	fig.suptitle("Many sites on one bench: pool off vs on (per-process budget, defaults)")
	fig.tight_layout()
	fig.savefig(path, dpi=90)


def main() -> int:
	out = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
	for name, draw in (("e2e", e2e), ("e2e-gthread", e2e), ("distance", distance), ("sites", sites)):
		source = out / f"{name}.json"
		if source.exists():
			data = json.loads(source.read_text())
			if name != "sites" and isinstance(data, dict):  # {"provenance": ..., "rows": [...]}
				data = data["rows"]
			draw(data, out / f"{name}.png")
			print(f"wrote {out / name}.png")
	return 0


if __name__ == "__main__":
	raise SystemExit(main())
