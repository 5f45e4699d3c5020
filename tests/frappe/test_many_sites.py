"""Many sites on one bench: the per-process connection budget, on real Frappe, pgBouncer and PostgreSQL.

One gunicorn or RQ process serves every site of a bench. The budget (db_pool_process_budget, "auto"
by default) bounds what a process keeps open across all sites: at most its peak of concurrent
checkouts, or a number; a connection for another site evicts the least recently used idle one.
These tests make their own quick sites (copies of FRAPPE_SITE's database: frappe_pgpool/testing/
sites.py), some with their own database and user, some sharing one, and remove them at the end.
"""

from __future__ import annotations

import collections
import json
import os
import time

import pytest

from frappe_pgpool.testing.sites import make_quick_sites, remove_quick_sites

from .bench import BENCH, SITE, bench_cli, requires_bench, run_in_bench
from .e2e import Gunicorn, status
from .sites import (
	Sampler,
	configs_restored,
	connection_timeline,
	logins,
	point_at,
	set_common_config,
	set_site_config,
	start_bouncer,
	tcp_connections,
	timeline_peaks,
	upstream,
	worker_of,
)
from .test_e2e import TOKEN_SCRIPT

pytestmark = [pytest.mark.frappe, requires_bench]

OWN = [f"ms{i:02d}.pgpool.test" for i in range(1, 11)]  # own database and user each
SHARED = [f"msh{i}.pgpool.test" for i in range(1, 4)]  # one database and user for the three
ALL = OWN + SHARED


@pytest.fixture(scope="module")
def fleet():
	token = run_in_bench(TOKEN_SCRIPT, site=SITE)[0]  # copied with the database: valid on every quick site
	remove_quick_sites(BENCH, ALL)  # fresh copies of the template (its API secret changes per run)
	quick = make_quick_sites(BENCH, SITE, OWN) + make_quick_sites(BENCH, SITE, SHARED, shared="msh")
	try:
		with configs_restored(ALL):
			bouncer = start_bouncer(quick, "session", default_pool_size=20)
			try:
				point_at(ALL, bouncer.host, bouncer.port)
				yield {
					"bouncer": bouncer,
					"token": token,
					"sites": {q.name: q for q in quick},
					"dbs": {q.db_name for q in quick},
				}
			finally:
				bouncer.__exit__(None, None, None)
	finally:
		remove_quick_sites(BENCH, ALL)


def test_quick_sites_are_separate_sites_and_shared_ones_share_a_database(fleet):
	sites = fleet["sites"]
	assert len({sites[s].db_name for s in OWN}) == len(OWN)
	assert len({sites[s].db_name for s in SHARED}) == 1
	with Gunicorn(workers=1) as web:
		for site in [OWN[0], *SHARED]:
			s = status(web, site, fleet["token"])
			assert s["site"] == site and s["current_database"] == sites[site].db_name == s["current_user"]
	# the template's own database keeps its owner
	template_db = json.loads(open(os.path.join(BENCH, "sites", SITE, "site_config.json")).read())["db_name"]
	(owner,) = upstream().query(
		"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (template_db,)
	)[0]
	assert owner == template_db


EVICTION_SCRIPT = """
import threading, time, psycopg2
import frappe
from frappe_pgpool.pool import registry
A, B, C, D, E1, E2 = json.loads(os.environ["PGPOOL_SITES"])
admin_dsn = os.environ["PGPOOL_ADMIN_DSN"]
site_of_db = json.loads(os.environ["PGPOOL_SITE_OF_DB"])  # own database each; only this process uses them here
order = []

def clients():
    conn = psycopg2.connect(admin_dsn); conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SHOW CLIENTS")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    conn.close()
    # by database, not application_name: a connection opened while keeping does not pay carries none
    return sorted(site_of_db[r["database"]] for r in rows if r["database"] in site_of_db)

def pool_of(site):
    return [p.snapshot() for k, p in registry.pools().items() if k.site == site]

class Holder(threading.Thread):
    # a request that checks out a connection for `site` and keeps it until released
    def __init__(self, site):
        super().__init__(daemon=True)
        self.site, self.error, self.pid, self.pid_after = site, None, None, None
        self.got, self.release = threading.Event(), threading.Event()
    def run(self):
        try:
            frappe.init(site=self.site); frappe.connect()
            self.pid = frappe.db.sql("select pg_backend_pid()")[0][0]  # the checkout happens here
            order.append(self.site)
            self.got.set()
            self.release.wait(60)
            self.pid_after = frappe.db.sql("select pg_backend_pid()")[0][0]
        except Exception as e:
            self.error = type(e).__name__ + ": " + str(e)
        finally:
            self.got.set()
            frappe.destroy()

def until(predicate, seconds=20):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, ("timed out waiting for a state", registry.snapshot(), steps)
        time.sleep(0.02)

steps = {}
frappe.init(site=C); frappe.connect(); frappe.db.sql("select 1"); frappe.destroy()  # C: one idle connection
steps["after C"] = dict(registry.snapshot(), clients=clients())
a = Holder(A); a.start(); a.got.wait()
steps["A in use, C idle"] = dict(registry.snapshot(), clients=clients())
b = Holder(B); b.start(); b.got.wait()  # budget 2 used up: C's idle connection is evicted for B
steps["A and B in use"] = dict(registry.snapshot(), clients=clients(), C=pool_of(C), A=pool_of(A))
d = Holder(D); d.start(); d.join(30)  # nothing idle to evict: D waits, then times out (its db_pool_timeout)
steps["D timed out"] = dict(registry.snapshot(), clients=clients())
e1 = Holder(E1); e1.start(); until(lambda: registry.snapshot()["waiting"] == 1)
e2 = Holder(E2); e2.start(); until(lambda: registry.snapshot()["waiting"] == 2)
steps["E1, E2 waiting"] = dict(registry.snapshot(), clients=clients())
a.release.set(); a.join(30); e1.got.wait(30)  # A returns: its slot goes to E1, first in line
until(lambda: registry.snapshot()["waiting"] == 1)
steps["E1 served"] = dict(registry.snapshot(), clients=clients(), E2_served=e2.got.is_set())
b.release.set(); b.join(30); e2.got.wait(30)
steps["E2 served"] = dict(registry.snapshot(), clients=clients())
e1.release.set(); e2.release.set(); e1.join(30); e2.join(30)
steps["end"] = dict(registry.snapshot(), clients=clients())
out({
    "steps": steps, "order": order,
    "errors": {h.site: h.error for h in (a, b, d, e1, e2)},
    "same_backend": {h.site: h.pid == h.pid_after for h in (a, b, e1, e2)},
})
"""


def test_budget_evicts_idle_connections_of_other_sites_never_one_in_use_and_waits_in_order(fleet):
	"""In one process (as gthread threads would), db_pool_process_budget 2 over six sites."""
	bouncer = fleet["bouncer"]
	a, b, c, d, e1, e2 = OWN[:6]
	set_common_config(db_pool_process_budget=2, db_pool_timeout=15)
	set_site_config([d], db_pool_timeout=1)  # the one that gives up
	try:
		(result,) = run_in_bench(
			EVICTION_SCRIPT,
			env={
				"PGPOOL_SITES": json.dumps([a, b, c, d, e1, e2]),
				"PGPOOL_ADMIN_DSN": bouncer.dsn(bouncer.admin_user, bouncer.admin_password, "pgbouncer"),
				"PGPOOL_SITE_OF_DB": json.dumps({fleet["sites"][s].db_name: s for s in (a, b, c, d, e1, e2)}),
			},
			timeout=180,
		)
	finally:
		set_common_config(db_pool_process_budget=None, db_pool_timeout=None)
		set_site_config([d], db_pool_timeout=None)
	steps = result["steps"]
	print("\n" + "\n".join(f"{name}: {json.dumps(step, default=str)}" for name, step in steps.items()))
	assert steps["after C"]["open"] == 1 and steps["after C"]["clients"] == [c]
	assert steps["A in use, C idle"]["open"] == 2 and steps["A in use, C idle"]["clients"] == sorted([a, c])
	# B took C's place: the idle connection of another site, not A's, which is in use
	held = steps["A and B in use"]
	assert held["open"] == 2 and held["clients"] == sorted([a, b]) and held["evictions"] == 1
	(c_pool,) = held["C"]
	assert c_pool["size"] == 0 and c_pool["evictions"] == {"budget": 1}
	(a_pool,) = held["A"]
	assert a_pool["in_use"] == 1 and not a_pool["evictions"]
	assert result["same_backend"][a]  # A's connection was never touched while in use
	# D found the budget used up and nothing idle: it waited and gave up after its db_pool_timeout
	assert "PoolTimeout" in (result["errors"][d] or ""), result["errors"]
	assert steps["D timed out"]["budget_timeouts"] == 1 and steps["D timed out"]["open"] == 2
	# E1 and E2 queued in that order and were served in that order, one free slot each
	assert steps["E1, E2 waiting"]["waiting"] == 2 and steps["E1, E2 waiting"]["open"] == 2
	assert steps["E1 served"]["E2_served"] is False and steps["E1 served"]["clients"] == sorted([b, e1])
	assert steps["E2 served"]["clients"] == sorted([e1, e2])
	assert result["order"] == [a, b, e1, e2]
	assert {site: err for site, err in result["errors"].items() if site != d} == dict.fromkeys([a, b, e1, e2])
	assert all(result["same_backend"].values())
	assert all(step["open"] <= 2 for step in steps.values())
	# C's connection was evicted for B. Six sites once each: under a numeric budget a site's first
	# checkout, which could not hit, says nothing to the reuse gate, so nothing is counted and the process
	# keeps (the budget's first round): A's and B's returns kept theirs, evicted for E1 and E2, and E1's
	# and E2's are kept (before that rule: (1, 4), A's to E2's returns closed theirs, not kept)
	assert (steps["end"]["evictions"], steps["end"]["not_reused"]) == (3, 0)
	assert steps["end"]["keeping"] is True and steps["end"]["budget_waits"] >= 3


def test_gthread_workers_over_many_sites_keep_at_most_their_peak(fleet):
	"""2 gthread workers x 4 threads, pings and status calls spread over 13 sites at c=8."""
	bouncer, token, dbs = fleet["bouncer"], fleet["token"], fleet["dbs"]
	calls = []
	for i in range(600):  # status calls on two sites that share a database and user: busy enough to be kept
		calls.append(
			("/api/method/frappe_pgpool.api.status", SHARED[(i // 4) % 2], token)
			if i % 4 == 0
			else ("/api/method/ping", ALL[(i * 7) % len(ALL)])
		)
	with Gunicorn(workers=2, threads=4) as web:
		pids = web.worker_pids()
		sampler = Sampler(dbs, bouncer, interval=0.1, sockets=(lambda: pids, bouncer.port))
		sampler.start()
		started = time.time()
		results = web.hammer(calls, concurrency=8)
		ended = time.time()
		samples = sampler.stop()
		statuses = web.each_worker(ALL, token)
	assert {code for code, _ in results} == {200}, collections.Counter(code for code, _ in results)
	# every status answer came from a connection opened for its own site, though the two share a database:
	# a kept one is named for its site and worker; one opened while keeping does not pay carries no name
	# (it is Frappe's own connection of this request, closed on return) and is on the site's database
	named = 0
	for (path, site, *_), (_, body) in zip(calls, results, strict=True):
		if path.endswith("status"):
			s = body["message"]
			owner = worker_of(s["application_name"])
			assert owner == (site, s["process_id"]) or (
				s["application_name"] == "" and s["current_database"] == fleet["sites"][site].db_name
			), s
			named += owner is not None
	clients, _servers = timeline_peaks(connection_timeline(bouncer, dbs), started, ended)
	sockets = sampler.peak_by_pid("sockets_by_pid")
	print(
		f"\ngthread 2x4, 600 requests over {len(ALL)} sites at c=8: most pgBouncer clients at once {clients} "
		f"(exact), sockets to pgBouncer per process {sockets} ({len(samples)} samples), status answers on a "
		f"kept connection {named}/150; budgets "
		+ json.dumps({pid: s["budget"] for pid, s in statuses.items()})
	)
	assert clients <= 2 * 4  # plain Frappe's peak: one connection per running request
	for pid in pids:
		budget = statuses[pid]["budget"]
		assert budget["process_budget"] == "auto" and 1 <= budget["peak"] <= 4
		assert budget["open"] <= budget["limit"] == budget["peak"]
		assert sockets[pid] <= budget["peak"]
	assert max(sockets.values()) >= 1  # the sampler saw the workers' connections
	assert named > 0  # kept connections served some of them
	assert not sampler.errors


def test_sync_workers_over_many_sites_hold_one_connection_each_without_pgbouncer(fleet):
	"""2 sync workers straight to PostgreSQL, pings round robin over 13 sites: one connection per worker."""
	token, dbs = fleet["token"], fleet["dbs"]
	pg = upstream()
	point_at(ALL, pg.host, pg.port)
	try:
		with Gunicorn(workers=2) as web:
			pids = web.worker_pids()
			sampler = Sampler(dbs, None, interval=0.05, sockets=(lambda: pids, pg.port))
			sampler.start()
			results = web.hammer([("/api/method/ping", ALL[i % len(ALL)]) for i in range(400)], concurrency=2)
			samples = sampler.stop()
			statuses = web.each_worker(ALL, token)
			after = tcp_connections(pids, pg.port)  # what each worker holds after the run
	finally:
		point_at(ALL, fleet["bouncer"].host, fleet["bouncer"].port)
	assert {code for code, _ in results} == {200}
	# the workers' own sockets to PostgreSQL (exact per sample; pg_stat_activity lists a backend until it
	# has exited, so an evicted one can show next to its replacement for a moment)
	sockets = sampler.peak_by_pid("sockets_by_pid")
	print(
		f"\nsync x2 direct, 400 pings over {len(ALL)} sites: most sockets to PostgreSQL per worker {sockets}, "
		f"backends per worker {sampler.peak_by_pid('backends_by_pid')} ({len(samples)} samples)"
	)
	# at most one each; round robin over 13 sites no checkout would hit, so from their second on the workers
	# close on return as plain Frappe does (budget "keeping" false) and may hold none between requests
	# (a connection lives a few ms of each request here: the samples may see none; the budget's own count,
	# below, is exact)
	assert all(n <= 1 for n in sockets.values()), sockets
	for pid in pids:
		budget = statuses[pid]["budget"]
		assert budget["limit"] == budget["peak"] == 1 and budget["open"] <= 1
	# after the run: at most one connection per worker
	assert all(n <= 1 for n in after.values()), after


def test_a_connection_the_worker_will_not_keep_is_opened_as_plain_frappe_opens_it(fleet):
	"""Round robin over 13 sites: no checkout would hit, so the worker closes what it opens on return, as
	plain Frappe does. Such a connection carries no application_name either (pgBouncer would SET it on the
	server it lends: a round trip per login that plain Frappe does not pay), nor the keepalives (libpq CPU
	at each login); only connect_timeout."""
	token = fleet["token"]
	with Gunicorn(workers=1) as web:
		results = web.hammer([("/api/method/ping", ALL[i % len(ALL)]) for i in range(60)], concurrency=1)
		shut = [status(web, ALL[(60 + i) % len(ALL)], token) for i in range(4)]
	assert {code for code, _ in results} == {200}
	print(f"\nshut gate, 1 sync worker: {[(s['application_name'], s['budget']['keeping']) for s in shut]}")
	assert all(s["budget"]["keeping"] is False for s in shut)
	assert all(s["application_name"] == "" for s in shut)
	assert all(s["connection_options"] == {"connect_timeout": "5"} for s in shut), shut[0][
		"connection_options"
	]


def test_one_site_keeps_one_login_per_worker(fleet):
	bouncer = fleet["bouncer"]
	site = OWN[0]
	db = fleet["sites"][site].db_name
	before = logins(bouncer, {db})
	with Gunicorn(workers=2) as web:
		results = web.hammer([("/api/method/ping", site)] * 300, concurrency=4)
		pids = web.worker_pids()
		clients = [c for c in bouncer.clients() if c["database"] == db]
	assert {code for code, _ in results} == {200}
	count = logins(bouncer, {db}) - before
	print(f"\none site, 2 sync workers, 300 pings: {count} logins")
	assert 1 <= count <= len(pids)
	owners = [worker_of(c["application_name"]) for c in clients]  # kept: each named for its worker
	assert None not in owners and {pid for _site, pid in owners} <= pids and len(clients) == count


def test_numeric_budget_bounds_each_worker(fleet):
	"""db_pool_process_budget 2 with 4 threads per worker: never more than 2 connections per process."""
	bouncer, token, dbs = fleet["bouncer"], fleet["token"], fleet["dbs"]
	set_common_config(db_pool_process_budget=2)
	try:
		with Gunicorn(workers=2, threads=4) as web:
			pids = web.worker_pids()
			sampler = Sampler(dbs, bouncer, interval=0.1, sockets=(lambda: pids, bouncer.port))
			sampler.start()
			started = time.time()
			results = web.hammer([("/api/method/ping", ALL[i % len(ALL)]) for i in range(400)], concurrency=8)
			ended = time.time()
			sampler.stop()
			statuses = web.each_worker(ALL, token)
	finally:
		set_common_config(db_pool_process_budget=None)
	assert {code for code, _ in results} == {200}
	clients, _ = timeline_peaks(connection_timeline(bouncer, dbs), started, ended)
	sockets = sampler.peak_by_pid("sockets_by_pid")
	print(
		f"\nbudget 2, gthread 2x4, 400 pings at c=8: clients at once {clients}, sockets per process {sockets}"
	)
	assert clients <= 2 * 2
	assert all(n <= 2 for n in sockets.values())  # sampled; `clients` above is exact, from pgBouncer's log
	for s in statuses.values():
		assert s["budget"]["process_budget"] == 2 and s["budget"]["open"] <= 2


def test_doctor_adds_up_every_site_of_the_bench(fleet, monkeypatch):
	"""An over-committed bench: 13 pooled sites behind one pgBouncer, 2 plain ones; doctor says where."""
	bouncer, quick = fleet["bouncer"], list(fleet["sites"].values())
	printed = {}
	for pool_size, workers, threads in ((2, 4, 4), (20, 30, 4)):
		small = start_bouncer(quick, "session", default_pool_size=pool_size)
		try:
			point_at(ALL, small.host, small.port)
			monkeypatch.setenv(
				"PGPOOL_ADMIN_DSN", small.dsn(small.admin_user, small.admin_password, "pgbouncer")
			)
			result = bench_cli(
				"pgpool",
				"doctor",
				"--web-workers",
				str(workers),
				"--threads",
				str(threads),
				site=SHARED[0],
				timeout=300,
			)
		finally:
			point_at(ALL, bouncer.host, bouncer.port)
			small.__exit__(None, None, None)
		print(
			f"\n$ bench --site {SHARED[0]} pgpool doctor --web-workers {workers} --threads {threads}  # pool_size {pool_size}"
		)
		print(result.stdout + result.stderr[-2000:])
		assert result.returncode == 1, result.stdout + result.stderr[-3000:]
		printed[pool_size] = result.stdout.splitlines()
	# pools of 2: each of the 11 pgBouncer pools (10 own databases, 1 shared by 3 sites) is over-committed;
	# with the budget a web process keeps at most its 4 threads' connections, whatever the number of sites
	errors = [line for line in printed[2] if line.startswith("ERROR pool size")]
	assert len(errors) == 11, printed[2]
	(shared,) = [line for line in errors if "msh1.pgpool.test, msh2.pgpool.test, msh3.pgpool.test" in line]
	assert "4 web x 4 + 3 job x 1 = 19 clients" in shared and "2 server connections" in shared
	assert any(line.startswith("ok    max_connections") for line in printed[2])
	# 30 workers x 4 threads: PostgreSQL's max_connections (100 here) is what no longer fits
	assert any(line.startswith("ERROR max_connections") for line in printed[20]), printed[20]
	assert any("db_pool_process_budget=auto" in line for line in printed[20])
