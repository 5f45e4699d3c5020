"""What a process publishes to the bench's real Redis is bounded, and what it no longer publishes goes.

One bench Python process makes 100 pools through the real registry (lazily: they hold no connection),
publishes a round to the bench's redis_cache, checks out from a pool that was summed in the first
round, and publishes again: that pool's site now has its own key, the site it displaced has none (not
left to expire while the summed report counts it too), and every checkout is in the totals read back.
"""

from __future__ import annotations

import pytest

from .bench import SITE, bench_cli, requires_bench, run_in_bench

pytestmark = [pytest.mark.frappe, requires_bench]

SCRIPT = """
import frappe, psycopg2
from frappe_pgpool import observe, publish
from frappe_pgpool.pool import PoolConfig, PoolKey, PoolRegistry

frappe.init(site=SITE)
conf = dict(frappe.conf)
frappe.destroy()
url = conf["redis_cache"]

def connect():
	return psycopg2.connect(
		host=conf.get("db_host") or "127.0.0.1", port=conf.get("db_port") or 5432,
		dbname=conf["db_name"], user=conf.get("db_user") or conf["db_name"], password=conf["db_password"],
	)

reg = PoolRegistry(reap_interval=0)
reg.set_process_budget(10)
config = PoolConfig(enabled=True, size=2)
keys = [PoolKey.make(f"bound{i:03}.test", "127.0.0.1", 5432, "u", "u", "p") for i in range(100)]
for key in keys:
	reg.pool(key, config)
publisher = publish.Publisher(reg)
publisher.configure(url)

def mine():
	return {r["site"]: r for r in publish.collect(url) if r["pid"] == os.getpid()}

try:
	publisher.publish()
	first = mine()
	summed = sorted(set(k.site for k in keys) - set(first))[-1]
	for _ in range(3):
		reg.putconn(reg.getconn(keys[[k.site for k in keys].index(summed)], config, connect))
	publisher.publish()
	second = mine()
	out(dict(
		first=sorted(first), second=sorted(second), summed=summed,
		other=second[observe.OTHER]["pools"][0],
		checkouts=sum(p["checkouts"] for r in second.values() for p in r["pools"]),
		rows=sum(len(r["pools"]) for r in second.values()),
		table=observe.render_table(list(second.values())),
	))
finally:
	publisher.retract()
	reg.close_all()
"""


def test_a_round_is_bounded_in_redis_and_a_site_no_longer_detailed_loses_its_key():
	(result,) = run_in_bench(SCRIPT, site=SITE)
	first, second = set(result["first"]), set(result["second"])
	detail = len(second) - 1
	assert len(first) == len(second) == detail + 1 and "(other)" in first and result["rows"] == detail + 1
	assert result["summed"] not in first and result["summed"] in second
	assert len(first - second) == 1  # the site it displaced: deleted from Redis, not left to expire
	assert (result["other"]["pools"], result["other"]["dropped"]) == (100 - detail, 0)
	assert result["checkouts"] == 3
	assert "total: 1/200 connections, 0 in use, 1 idle, 0 waiting; 3 checkouts, 1 created" in result["table"]
	# and the site's own status is read as before (its report keys are untouched by these)
	status = bench_cli("pgpool", "status", "--json", timeout=300)
	assert status.returncode == 0, status.stderr[-2000:]
