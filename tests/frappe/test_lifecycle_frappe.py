"""A kept session ends where Frappe's own tools expect a connection to end (issue 23, item 3), on the real
bench: RQ's work-horses, forked by `bench worker` to run one job each and left by os._exit, end their
connections as plain Frappe does, so pgBouncer (session mode) keeps no server behind them."""

from __future__ import annotations

import os
import time

import pytest

from .bench import SITE, bench_cli, requires_bench, run_in_bench
from .e2e import read_site_config, sites_behind_pgbouncer

pytestmark = [pytest.mark.frappe, requires_bench]
SITE2 = os.environ.get("FRAPPE_SITE2", "")

ENQUEUE = """
import frappe
frappe.init(site=SITE); frappe.connect()
for _ in range({n}):
    frappe.enqueue("frappe.client.get_count", doctype="ToDo", queue="{queue}")
frappe.db.commit(); frappe.destroy()
out({n})
"""


def servers(bouncer, db: str) -> int:
	rows = [row for row in bouncer.admin("SHOW POOLS") if row["database"] == db]
	keys = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
	return sum(int(row[k]) for row in rows for k in keys)


@pytest.mark.skipif(not SITE2, reason="FRAPPE_SITE2 not set: the jobs run on two sites")
def test_forked_work_horses_leave_pgbouncer_no_server():
	sites = [SITE, SITE2]
	dbs = [read_site_config(site)["db_name"] for site in sites]
	jobs = 3
	with sites_behind_pgbouncer(sites) as (bouncer, _upstream):
		for site in sites:
			run_in_bench(ENQUEUE.format(n=jobs, queue="short"), site=site)
		before = {db: bouncer.logins(db) for db in dbs}
		done = bench_cli("worker", "--queue", "short", "--burst", site=None)
		assert done.returncode == 0, done.stderr[-3000:]
		logins = {db: bouncer.logins(db) - before[db] for db in dbs}
		left = {db: servers(bouncer, db) for db in dbs}
		for _ in range(100):  # pgBouncer accounts a client's disconnect asynchronously
			if not any(left.values()):
				break
			time.sleep(0.05)
			left = {db: servers(bouncer, db) for db in dbs}
	print(f"\n{jobs} forked jobs on each of {len(sites)} sites: logins {logins}, servers left {left}")
	assert all(n >= jobs for n in logins.values())  # a work-horse is a new process: its own login
	assert left == {db: 0 for db in dbs}  # plain Frappe leaves none: neither does the pool
