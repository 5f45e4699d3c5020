"""What the pool adds to a request it does not keep a connection for, in one process, side by side.

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local python benchmarks/plain_path.py

Two sets of --sites quick sites straight to PostgreSQL (own database and user each): one with the pool
off (plain Frappe), one with it on and its reuse gate shut (every connection closed on return, as plain
Frappe closes it: the path a request takes when its site would not hit). One bench Python process runs
blocks of --block requests (frappe.init / connect / two queries / destroy, as a request would) over one
set, then the other, the order turning every block, --blocks times each. The two sets share the process,
its caches and the machine's load of the moment, so the paired blocks differ only by the pool: printed
as on/off of CPU and wall per request, the geometric mean over the pairs with its 95% interval. What the
process cannot see: HTTP, gunicorn and pgBouncer (there is none here), and what other processes pay.
--ablate names parts to leave out of the pooled set, to find what costs what (a measurement, never
how the pool ships): "options" (no libpq options at all), "finalizer" (no weak reference watching the
Database), "engine" (a pass-through registry: no budget, gate, records or stats), or several, comma
separated. --unpatched measures the off side itself instead: the pool-off sites with the app's wrappers
installed against the same sites with the patch uninstalled (Frappe as it ships), alternating the same way.
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

PROBE = """
import random, time
import frappe
from frappe_pgpool import frappe_layer
from frappe_pgpool.pool import budget

budget.REUSE_MIN_RATE = budget.REUSE_MIN_RATE_ONE_SLOT = 2.0  # shut once the first return is counted
parts = set(filter(None, os.environ["PGPOOL_ABLATE"].split(",")))
if "options" in parts:
    frappe_layer.connect_options = lambda *args: {}
if "finalizer" in parts:
    frappe_layer._watch = lambda instance, conn: None
if "engine" in parts:
    class PassThrough:  # the registry's calls, without its bookkeeping
        def __init__(self):
            self.mine = set()
        def getconn(self, key, config, connect, budget=None):
            conn = connect()
            self.mine.add(id(conn))
            return conn
        def putconn(self, conn, discard=False):
            self.mine.discard(id(conn))
            conn.close()
            return True
        def owns(self, conn):
            return id(conn) in self.mine
        def pools(self):
            return {}
        def snapshot(self):
            return {"not_reused": "(engine ablated)"}
    frappe_layer.registry = PassThrough()
unpatched = os.environ["PGPOOL_UNPATCHED"] == "1"
if unpatched:  # both arms on the pool-off sites: installed (its wrappers run) vs the patch uninstalled
    from frappe_pgpool import patch
    os.environ["PGPOOL_ON"] = os.environ["PGPOOL_OFF"]
off, on = os.environ["PGPOOL_OFF"].split(), os.environ["PGPOOL_ON"].split()
block = int(os.environ["PGPOOL_BLOCK"])
rng = random.Random(1)

{request}
for site in off[:3] + on[:3]:  # imports, and the pooled process's first (kept) connection
    request(site)
warm_closed = frappe_layer.registry.snapshot()["not_reused"]  # the warm-up's own, not reported
figures = {"off": [], "on": []}
for n in range(int(os.environ["PGPOOL_BLOCKS"])):
    order = [("off", off), ("on", on)] if n % 2 == 0 else [("on", on), ("off", off)]
    for name, sites in order:
        if unpatched:
            patch.uninstall() if name == "on" else patch.install()
        plan = [rng.choice(sites) for _ in range(block)]
        cpu, wall = time.process_time(), time.perf_counter()
        for site in plan:
            request(site)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        figures[name].append((cpu * 1000 / block, wall * 1000 / block))
stats = frappe_layer.registry.snapshot()
closed = stats["not_reused"]
figures["closed_not_reused"] = closed - warm_closed if isinstance(closed, int) else closed
out(figures)
"""
PROBE = PROBE.replace("{request}", REQUEST)


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--sites", type=int, default=10, help="sites per set")
	parser.add_argument("--block", type=int, default=25, help="requests per block")
	parser.add_argument("--blocks", type=int, default=40, help="blocks per set")
	parser.add_argument(
		"--ablate", default="", help="comma-separated parts left out: options, finalizer, engine"
	)
	parser.add_argument(
		"--unpatched",
		action="store_true",
		help="instead: the app installed with pooling off against the patch uninstalled (plain Frappe)",
	)
	args = parser.parse_args()
	unknown = set(filter(None, args.ablate.split(","))) - {"options", "finalizer", "engine"}
	if unknown:
		parser.error(f"--ablate: unknown part(s) {', '.join(sorted(unknown))}")
	off = [f"plainoff{i:02d}.sites.local" for i in range(1, args.sites + 1)]
	on = [f"plainon{i:02d}.sites.local" for i in range(1, args.sites + 1)]
	make_quick_sites(BENCH, SITE, off + on)
	try:
		with configs_restored(off + on):
			set_site_config(off, db_pool_enabled=0)
			set_site_config(on, db_pool_enabled=1)
			env = {
				"PGPOOL_OFF": " ".join(off),
				"PGPOOL_ON": " ".join(on),
				"PGPOOL_BLOCK": str(args.block),
				"PGPOOL_BLOCKS": str(args.blocks),
				"PGPOOL_ABLATE": args.ablate,
				"PGPOOL_UNPATCHED": "1" if args.unpatched else "0",
			}
			(figures,) = run_in_bench(PROBE, site=on[0], env=env, timeout=1800)
	finally:
		remove_quick_sites(BENCH, off + on)
	requests = args.block * args.blocks
	if args.unpatched:  # the "off" side ran with the wrappers installed, the "on" side without them
		print(
			f"{args.sites} sites, pooling off, {args.blocks} blocks of {args.block} requests per side, one process"
		)
		sides = (("installed", "off"), ("unpatched", "on"))
	else:
		print(
			f"{args.sites} sites per set, {args.blocks} blocks of {args.block} requests each, one process"
			f"{', ablated: ' + args.ablate if args.ablate else ''}; pooled connections closed on return: "
			f"{figures['closed_not_reused']} of {requests}"
		)
		sides = (("on", "on"), ("off", "off"))
	(top, top_key), (bottom, bottom_key) = sides
	for i, what in enumerate(("CPU", "wall")):
		top_ms = [f[i] for f in figures[top_key]]
		bottom_ms = [f[i] for f in figures[bottom_key]]
		pairs = list(zip(top_ms, bottom_ms, strict=True))
		print(
			f"{what:4} per request: {bottom} {statistics.median(bottom_ms):.3f} ms, {top} "
			f"{statistics.median(top_ms):.3f} ms (medians of the blocks); {top}/{bottom} "
			f"{ratio_text(paired_ratio(pairs), 3)}"
		)
	return 0


if __name__ == "__main__":
	sys.exit(main())
