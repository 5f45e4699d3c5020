"""What a kept miss costs, in one process: plain Frappe vs the pool with its reuse gate forced.

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local python benchmarks/kept_miss.py

Traffic spread uniformly over --sites quick sites (own database and user each, straight to PostgreSQL),
so almost every checkout is a miss. One bench Python process per row runs --checkouts times
frappe.init / connect / two queries / destroy, as a request would, and reports CPU and wall per
checkout. Rows, alternating every round:

- off: plain Frappe (db_pool_enabled 0);
- closing: the pool with the gate shut (every miss closed on return, as plain Frappe closes it);
- keeping: the pool with the gate forced open (every miss kept, reset on return, evicted later);
- default: the pool as it ships.

keeping less closing is what each kept miss costs (the return's rollback and reset, the eviction);
closing less off is what the pool adds to a miss. No HTTP, no gunicorn: the figures leave out what a
request adds around the connection, and the process is the only client of its sites.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from frappe_pgpool.testing.sites import make_quick_sites, remove_quick_sites  # noqa: E402
from tests.frappe.bench import BENCH, SITE, run_in_bench  # noqa: E402
from tests.frappe.sites import configs_restored, set_site_config  # noqa: E402

# one request's database work, as the probes of this file and plain_path.py run it in a bench process
REQUEST = """
def request(site):
    frappe.init(site=site)
    frappe.connect()
    frappe.db.sql("select 1")
    frappe.db.sql("select 2")
    frappe.destroy()
"""

PROBE = """
import random, time
import frappe
from frappe_pgpool.pool import budget

gate = os.environ["PGPOOL_GATE"]
if gate == "keeping":  # every checkout pays (this process has one slot: both rates)
    budget.REUSE_MIN_RATE = budget.REUSE_MIN_RATE_ONE_SLOT = 0.0
elif gate == "closing":  # none does, once the first return is counted
    budget.REUSE_MIN_RATE = budget.REUSE_MIN_RATE_ONE_SLOT = 2.0
sites = os.environ["PGPOOL_SITES"].split()
rng = random.Random(int(os.environ["PGPOOL_SEED"]))
plan = [rng.choice(sites) for _ in range(int(os.environ["PGPOOL_CHECKOUTS"]))]

{request}
for site in sites[:3]:  # imports and the first connection of the process
    request(site)
cpu, wall = time.process_time(), time.perf_counter()
for site in plan:
    request(site)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
out({"cpu_ms": cpu * 1000 / len(plan), "wall_ms": wall * 1000 / len(plan)})
"""
PROBE = PROBE.replace("{request}", REQUEST)

ROWS = ("off", "closing", "keeping", "default")


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--sites", type=int, default=20)
	parser.add_argument("--checkouts", type=int, default=600)
	parser.add_argument("--rounds", type=int, default=5)
	args = parser.parse_args()
	names = [f"kept{i:02d}.sites.local" for i in range(1, args.sites + 1)]
	make_quick_sites(BENCH, SITE, names)
	results: dict[str, list[dict]] = {row: [] for row in ROWS}
	try:
		with configs_restored(names):
			for round_ in range(args.rounds):
				order = ROWS if round_ % 2 == 0 else ROWS[::-1]
				for row in order:
					set_site_config(names, db_pool_enabled=0 if row == "off" else 1)
					env = {
						"PGPOOL_GATE": row,
						"PGPOOL_SITES": " ".join(names),
						"PGPOOL_SEED": str(round_),
						"PGPOOL_CHECKOUTS": str(args.checkouts),
					}
					(figures,) = run_in_bench(PROBE, site=names[0], env=env)
					results[row].append(figures)
	finally:
		remove_quick_sites(BENCH, names)
	print(f"{args.sites} sites, {args.checkouts} checkouts x {args.rounds} rounds, medians per checkout")
	for row in ROWS:
		cpu = statistics.median(r["cpu_ms"] for r in results[row])
		wall = statistics.median(r["wall_ms"] for r in results[row])
		rounds = ", ".join(f"{r['cpu_ms']:.2f}" for r in results[row])
		print(f"{row:8} CPU {cpu:.3f} ms, wall {wall:.3f} ms (CPU per round: {rounds})")
	return 0


if __name__ == "__main__":
	sys.exit(main())
