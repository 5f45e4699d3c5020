"""One cell of benchmarks/sites.py, pool off vs on side by side, over many rounds.

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local python benchmarks/miss_path.py \\
        --placement session --workers "sync 4" --shape own --traffic uniform --requests 1000 --rounds 8

Traffic over --sites quick sites, each with its own database and user (`own`) or in groups of 5
sharing one (`shared`), uniform or Zipf (s=1.1) as in benchmarks/sites.py. Uniform traffic is the miss
path: almost every request needs a new connection and the reuse gate closes returned ones as plain
Frappe does, so what is left to compare is what the pool adds to a miss. Each row is one of
benchmarks/sites.py (Run.placed_row: fresh gunicorn workers and a fresh pgBouncer unless --placement
direct, the same warm-up and sampling); off and on alternate, the order turning every round. Prints
each row, then the medians of req/s, worker CPU per request (utime + stime of the workers, /proc) and
p95, and how many pooled rounds were below pool off's median. The load generator is closed-loop Python
on the same cores (see benchmarks/sites.py for what it can and cannot see).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sites import WORKERS, Run, make_shared_sites, plan  # noqa: E402
from frappe_pgpool.testing.sites import make_quick_sites, remove_quick_sites  # noqa: E402
from tests.frappe.bench import BENCH, SITE  # noqa: E402
from tests.frappe.sites import configs_restored  # noqa: E402


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--placement", choices=("session", "transaction", "direct"), default="session")
	parser.add_argument("--workers", choices=list(WORKERS), default="sync 4")
	parser.add_argument("--shape", choices=("own", "shared"), default="own")
	parser.add_argument("--traffic", choices=("uniform", "zipf"), default="uniform")
	parser.add_argument("--sites", type=int, default=20)
	parser.add_argument("--requests", type=int, default=1000)
	parser.add_argument("--rounds", type=int, default=4)
	parser.add_argument("--warmup", type=int, default=40, help="pings before each row's measured ones")
	args = parser.parse_args()
	names = [f"miss{i:02d}.sites.local" for i in range(1, args.sites + 1)]
	if args.shape == "own":
		quick = make_quick_sites(BENCH, SITE, names)
	else:  # groups of 5 sharing a database and user, as benchmarks/sites.py's default --group
		quick = make_shared_sites(names, 5, "missgrp")
	# the rows of benchmarks/sites.py, with its defaults: same warm-up, sampling and pgBouncer
	run = Run(argparse.Namespace(warmup=args.warmup, sample=0.25, pool_size=20))
	run.all_sites = names
	results: dict[str, list[dict]] = {"off": [], "on": []}
	try:
		with configs_restored(names):
			for round_ in range(args.rounds):
				for pool in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
					row = run.placed_row(
						args.placement,
						quick,
						workers=args.workers,
						shape=args.shape,
						traffic=args.traffic,
						pool=pool,
						sites=names,
						calls=plan(names, args.traffic, args.requests, round_, 1.1),
						dbs={q.db_name for q in quick},
						round=round_ + 1,
					)
					results[pool].append(row)
	finally:
		remove_quick_sites(BENCH, names)
	for pool, rows in results.items():
		rps, cpu, p95 = (statistics.median(r[k] for r in rows) for k in ("rps", "worker_cpu_ms", "p95"))
		errors = sum(r["errors"] for r in rows)
		print(
			f"median pool {pool}: {rps:.0f} req/s, worker CPU {cpu:.3f} ms/request, p95 {p95:.1f} ms, "
			f"errors {errors}"
		)
	off, on = (statistics.median(r["rps"] for r in results[p]) for p in ("off", "on"))
	below = sum(r["rps"] < off for r in results["on"])
	print(f"req/s on/off x{on / off:.2f}; pooled rounds below pool off's median: {below} of {args.rounds}")
	return 0


if __name__ == "__main__":
	sys.exit(main())
