"""What the app's wrappers cost a request of a site with pooling off, split into wrapt and our code.

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local python benchmarks/wrapper_cost.py

Ten quick sites with `db_pool_enabled: 0`, one bench Python process, blocks of --block requests
(frappe.init / connect / two queries / destroy) under each arm in turn, the order turning every block:
`unpatched` (Frappe as it ships), `pass-through` (wrapt FunctionWrappers on the same four targets that
only call through: what wrapt itself costs), `<target>` (pass-through everywhere but our wrapper on that
one target), `installed` (all four of ours). Printed: CPU per request of each arm against pass-through
and pass-through against unpatched, geometric means over the paired blocks with 95% intervals. What it
cannot see: HTTP, gunicorn, the before_request hook, other processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.kept_miss import REQUEST  # noqa: E402
from benchmarks.sites import paired_ratio, ratio_text  # noqa: E402
from frappe_pgpool.testing.sites import make_quick_sites, remove_quick_sites  # noqa: E402
from tests.frappe.bench import BENCH, SITE, run_in_bench  # noqa: E402
from tests.frappe.sites import configs_restored, set_site_config  # noqa: E402

ARMS = ("unpatched", "pass-through", "connect", "get_connection", "close", "sql", "installed")

PROBE = """
import random, time
import frappe, psycopg2, wrapt
from frappe.database.database import Database
from frappe.database.postgres.database import PostgresDatabase
from frappe_pgpool import frappe_layer, patch

sites = os.environ["PGPOOL_SITES"].split()
block, blocks = int(os.environ["PGPOOL_BLOCK"]), int(os.environ["PGPOOL_BLOCKS"])
arms = os.environ["PGPOOL_ARMS"].split(",")
rng = random.Random(1)
{request}
for site in sites[:3]:  # imports
    request(site)

def pass_through(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs)

targets = {
    "connect": (psycopg2, frappe_layer.psycopg2_connect),
    "get_connection": (PostgresDatabase, frappe_layer.get_connection),
    "close": (Database, frappe_layer.close),
    "sql": (Database, frappe_layer.sql),
}
patch.uninstall()

def wrap(arm):
    if arm == "unpatched":
        return
    for attr, (owner, ours) in targets.items():
        wrapper = ours if arm in ("installed", attr) else pass_through
        wrapt.wrap_object(owner, attr, wrapt.FunctionWrapper, (wrapper,))

def unwrap(arm):
    if arm == "unpatched":
        return
    for attr, (owner, _ours) in targets.items():
        setattr(owner, attr, vars(owner)[attr].__wrapped__)

figures = {arm: [] for arm in arms}
for n in range(blocks):
    plan = [rng.choice(sites) for _ in range(block)]  # the same requests for every arm of the block
    for arm in arms[n % len(arms):] + arms[:n % len(arms)]:
        wrap(arm)
        cpu = time.process_time()
        for site in plan:
            request(site)
        figures[arm].append((time.process_time() - cpu) * 1000 / block)
        unwrap(arm)
out(figures)
""".replace("{request}", REQUEST)


def paired(top: list[float], bottom: list[float]) -> str:
	return ratio_text(paired_ratio(list(zip(top, bottom, strict=True))), 3)


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--block", type=int, default=25, help="requests per block")
	parser.add_argument("--blocks", type=int, default=70, help="blocks per arm")
	args = parser.parse_args()
	sites = [f"wrapcost{i:02d}.sites.local" for i in range(1, 11)]
	make_quick_sites(BENCH, SITE, sites)
	try:
		with configs_restored(sites):
			set_site_config(sites, db_pool_enabled=0)
			env = {
				"PGPOOL_SITES": " ".join(sites),
				"PGPOOL_BLOCK": str(args.block),
				"PGPOOL_BLOCKS": str(args.blocks),
				"PGPOOL_ARMS": ",".join(ARMS),
			}
			(figures,) = run_in_bench(PROBE, site=sites[0], env=env, timeout=3600)
	finally:
		remove_quick_sites(BENCH, sites)
	base = figures["pass-through"]
	print(
		f"10 sites with pooling off, {args.blocks} blocks of {args.block} requests per arm, one process; "
		"CPU per request (median of the blocks) and paired ratio"
	)
	print(f"  unpatched       {statistics.median(figures['unpatched']):.3f} ms")
	print(
		f"  pass-through    {statistics.median(base):.3f} ms   vs unpatched {paired(base, figures['unpatched'])}"
	)
	for arm in ARMS[2:]:
		print(
			f"  {arm:15} {statistics.median(figures[arm]):.3f} ms   vs pass-through {paired(figures[arm], base)}"
		)
	return 0


if __name__ == "__main__":
	sys.exit(main())
