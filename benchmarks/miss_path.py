"""The miss path, side by side: pool off vs on for one shape of benchmarks/sites.py, many rounds.

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local python benchmarks/miss_path.py \\
        --placement session --workers 4 --requests 1000 --rounds 4

Traffic spread uniformly over --sites quick sites (own database and user each), so that almost every
request needs a new connection and the reuse gate closes returned ones as plain Frappe does: what is
left to compare is what the pool adds to a miss. Off and on alternate on fresh gunicorn workers (and a
fresh pgBouncer unless --placement direct), the order turning every round. Prints req/s, worker CPU per
request (utime + stime of the workers, /proc) and p95 per round, then the medians. The load generator is
closed-loop Python on the same cores (see benchmarks/sites.py for what it can and cannot see).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sites import load, percentile, plan, worker_cpu  # noqa: E402
from frappe_pgpool.testing.sites import make_quick_sites, remove_quick_sites  # noqa: E402
from tests.frappe.bench import BENCH, SITE  # noqa: E402
from tests.frappe.e2e import Gunicorn  # noqa: E402
from tests.frappe.sites import configs_restored, point_at, set_site_config, start_bouncer, upstream  # noqa: E402


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--placement", choices=("session", "transaction", "direct"), default="session")
	parser.add_argument("--workers", type=int, default=4, help="sync gunicorn workers (one client each)")
	parser.add_argument("--sites", type=int, default=20)
	parser.add_argument("--requests", type=int, default=1000)
	parser.add_argument("--rounds", type=int, default=4)
	args = parser.parse_args()
	names = [f"miss{i:02d}.sites.local" for i in range(1, args.sites + 1)]
	quick = make_quick_sites(BENCH, SITE, names)
	results: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
	try:
		with configs_restored(names):
			for round_ in range(args.rounds):
				for pool in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
					bouncer = None
					if args.placement == "direct":
						pg = upstream()
						point_at(names, pg.host, pg.port)
					else:
						bouncer = start_bouncer(quick, args.placement, default_pool_size=20)
						point_at(names, bouncer.host, bouncer.port)
					set_site_config(names, db_pool_enabled=int(pool == "on"))
					try:
						with Gunicorn(workers=args.workers, threads=1) as web:
							load(web, plan(names, "uniform", 60, 7, 0), args.workers)  # warm-up
							cpu0 = worker_cpu(web)
							latencies, errors, elapsed = load(
								web, plan(names, "uniform", args.requests, round_, 0), args.workers
							)
							cpu = (worker_cpu(web) - cpu0) * 1000 / args.requests
					finally:
						if bouncer is not None:
							bouncer.__exit__(None, None, None)
					row = (len(latencies) / elapsed, cpu, percentile(latencies, 0.95))
					results[pool].append(row)
					print(
						f"round {round_ + 1} pool {pool}: {row[0]:.0f} req/s, worker CPU {row[1]:.3f} ms/request, "
						f"p95 {row[2]:.1f} ms, errors {sum(errors.values())}",
						flush=True,
					)
	finally:
		remove_quick_sites(BENCH, names)
	for pool, rows in results.items():
		rps, cpu, p95 = (statistics.median(r[i] for r in rows) for i in range(3))
		print(f"median pool {pool}: {rps:.0f} req/s, worker CPU {cpu:.3f} ms/request, p95 {p95:.1f} ms")
	return 0


if __name__ == "__main__":
	sys.exit(main())
