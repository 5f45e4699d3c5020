"""Read replicas: Frappe's read_from_replica against a real hot standby, over HTTP on real gunicorn.

A physical hot standby of the sites' PostgreSQL (frappe_pgpool.testing.standby.HotStandby) serves as
the replica; the sites' configs get read_from_replica, replica_host and replica_db_port for the run
(restored after). A test-only module with whitelisted methods is put into the bench's Frappe package
for the run (Frappe serves /api/method/ only from installed apps' modules) and removed after: it
reports, statement by statement, which server session served it (pg_is_in_recovery, inet_server_port,
backend pid, current_user) and the process's pools, from inside and after a frappe.read_only block.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
import uuid
from pathlib import Path

import psycopg2.errors
import pytest

from frappe_pgpool.testing.standby import HotStandby

from .bench import BENCH, SITE, requires_bench, run_in_bench
from .e2e import Gunicorn, read_site_config, site_config_path, write_site_config
from .test_e2e import TOKEN_SCRIPT

pytestmark = [pytest.mark.frappe, requires_bench]
SITE2 = os.environ.get("FRAPPE_SITE2", "")
SUPERUSER = os.environ.get("PGPOOL_E2E_PG_SUPERUSER", "postgres")
PROBE = "frappe.pgpool_replica_probe"


PROBE_SOURCE = '''
"""Test-only endpoints of frappe_pgpool's replica tests (tests/frappe/test_replica.py); removed after."""
import os

import frappe
from frappe_pgpool import observe
from frappe_pgpool.pool import registry


def who():
	pid, recovery, user, port = frappe.db.sql(
		"select pg_backend_pid(), pg_is_in_recovery(), current_user, inet_server_port()"
	)[0]
	return {"pid": pid, "recovery": recovery, "user": user, "port": port}


def pools():
	found = []
	for key, pool in registry.pools().items():
		if key.site == frappe.local.site:
			s = pool.snapshot()
			fields = ("size", "idle", "in_use", "created", "checkouts", "closed")
			found.append({"port": key.port, "user": key.user, **{k: s[k] for k in fields}})
	return sorted(found, key=lambda p: (p["port"], p["user"]))


@frappe.read_only()
def read_block(write):
	seen = who()
	seen["pools"] = pools()
	if write:
		try:
			frappe.db.sql("insert into `tabNote` (name, title) values (%s, %s)", (write, write))
			seen["write"] = "succeeded"
		except Exception as e:
			seen["write"] = type(e).__name__
	return seen


@frappe.whitelist(allow_guest=True)
def probe(write=""):
	"""A primary statement, a frappe.read_only block, then the primary again: who served each."""
	first = who()
	if write:  # an uncommitted write on the primary before the block: must survive the block
		frappe.db.sql("insert into `tabNote` (name, title) values (%s, %s)", ("p-" + write, write))
	replica = read_block(write)
	after = who()
	if write:
		after["own_write_visible"] = frappe.db.sql(
			"select count(*) from `tabNote` where name = %s", ("p-" + write,)
		)[0][0]
		frappe.db.rollback()
	return {
		"process_id": os.getpid(),
		"first": first,
		"replica": replica,
		"after": after,
		"pools_after_block": pools(),
		**observe.process_fields(registry),
	}


@frappe.whitelist(allow_guest=True)
def maintenance():
	"""Under maintenance_mode with allow_reads_during_maintenance the whole request reads the replica."""
	first = who()
	written = frappe.write_only()(who)()  # as frappe's access log writes during a read-only request
	return {"first": first, "written": written, "pools": pools()}


@frappe.whitelist(allow_guest=True)
@frappe.read_only()
def read_only_method():
	"""A whitelisted method decorated with frappe.read_only, as Frappe's report endpoints are."""
	return {"process_id": os.getpid(), "who": who(), "pools": pools()}
'''


@pytest.fixture(scope="module")
def standby():
	config = read_site_config(SITE)
	host, port = config.get("db_host") or "127.0.0.1", int(config.get("db_port") or 5432)
	replica = HotStandby(host, port, SUPERUSER)
	(row,) = replica.primary_execute("SHOW hba_file")
	hba = Path(row["hba_file"])
	hba_before = hba.read_bytes()
	try:
		replica.start()
		assert replica._hba_line.encode() in hba.read_bytes()
		print(f"\nhot standby on port {replica.port}: {replica.timings}")
		yield replica
	finally:
		replica.stop()
	assert hba.read_bytes() == hba_before  # the primary's pg_hba.conf is back to its bytes of before


@pytest.fixture(scope="module")
def probe_module():
	path = Path(BENCH, "apps", "frappe", *PROBE.split(".")).with_suffix(".py")
	path.write_text(PROBE_SOURCE)
	try:
		yield PROBE
	finally:
		path.unlink()
		for compiled in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
			compiled.unlink()


@contextlib.contextmanager
def replica_config(standby: HotStandby, site: str, **extra):
	"""The site reads from the standby for the duration; its site_config.json is restored after."""
	original = site_config_path(site).read_text()
	config = read_site_config(site)
	write_site_config(
		site,
		{
			**config,
			"db_pool_enabled": 1,
			"read_from_replica": 1,
			"replica_host": standby.host,
			"replica_db_port": standby.port,
			**extra,
		},
	)
	try:
		yield config
	finally:
		site_config_path(site).write_text(original)


@contextlib.contextmanager
def replica_role(standby: HotStandby):
	"""A separate read-only role, created on the primary (a standby is read-only); it replicates."""
	name, password = f"pgpool_ro_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
	standby.primary_execute(f'CREATE ROLE "{name}" LOGIN PASSWORD %s IN ROLE pg_read_all_data', (password,))
	try:
		standby.wait_for_replay()
		yield name, password
	finally:
		standby.primary_execute(f'DROP ROLE "{name}"')


def probe(web: Gunicorn, site: str, **args) -> dict:
	query = "&".join(f"{k}={v}" for k, v in args.items())
	code, body = web.request(f"/api/method/{PROBE}.probe?{query}", site)
	assert code == 200, body
	return body["message"]


def replica_pool(pools: list[dict], standby: HotStandby) -> dict:
	(pool,) = [p for p in pools if p["port"] == str(standby.port)]
	return pool


def test_the_standby_is_a_real_hot_standby_of_the_sites_database(standby):
	db = read_site_config(SITE)["db_name"]
	(row,) = standby.execute(
		"SELECT pg_is_in_recovery() AS recovery, inet_server_port() AS port, "
		"(SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming') AS streaming"
	)
	assert row == {"recovery": True, "port": standby.port, "streaming": 1}
	(tables,) = standby.execute(
		"SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'tabToDo'", dbname=db
	)
	assert tables["n"] == 1
	with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
		standby.execute("CREATE TABLE pgpool_nope (x int)", dbname=db)


def test_read_only_is_served_by_the_standby_and_the_rest_of_the_request_by_the_primary(standby, probe_module):
	db = read_site_config(SITE)["db_name"]
	site_user = read_site_config(SITE).get("db_user") or db
	token = run_in_bench(TOKEN_SCRIPT)[0]
	with replica_config(standby, SITE) as config, Gunicorn(workers=1) as web:
		primary_port = int(config.get("db_port") or 5432)
		logins_before = standby.logins(site_user, db)
		results = [probe(web, SITE) for _ in range(60)]
		methods = [web.request(f"/api/method/{PROBE}.read_only_method", SITE) for _ in range(20)]
		# Frappe's own read_only endpoint (list views' counts), token-authenticated on the primary
		counts = [
			web.request("/api/method/frappe.desk.reportview.get_count?doctype=ToDo", SITE, token)
			for _ in range(40)
		]
		final = probe(web, SITE)
		on_standby = {r["pid"]: r for r in standby.backends(db)}
		logins = standby.logins(site_user, db) - logins_before
	(worker,) = {r["process_id"] for r in results}
	for r in results:
		# the read_only block: the standby's session, as the site user
		assert r["replica"]["recovery"] is True and r["replica"]["port"] == standby.port
		assert r["replica"]["user"] == site_user
		# before and after it, in the same request: the primary, the very same session
		assert r["first"]["recovery"] is False and r["first"]["port"] == primary_port
		assert r["after"] == r["first"]
		# inside the block the replica connection is checked out, the primary's stays checked out
		inside = replica_pool(r["replica"]["pools"], standby)
		assert inside["in_use"] == 1
		# after the block (read_only's finally closes local.db) it is back in its pool
		back = replica_pool(r["pools_after_block"], standby)
		assert back["in_use"] == 0 and back["idle"] == 1
		assert all(p["size"] <= 1 for p in r["pools_after_block"])
		if "budget" in r:  # the per-process budget counts the replica connection too
			assert r["budget"]["open"] == sum(p["size"] for p in r["pools_after_block"])
	replica_pids = {r["replica"]["pid"] for r in results}
	primary_pids = {r["first"]["pid"] for r in results}
	assert len(replica_pids) == 1 and len(primary_pids) == 1  # reused across 60 requests
	(replica_pid,) = replica_pids
	assert on_standby[replica_pid]["application_name"] == f"frappe:{SITE}:{worker}"
	last = results[-1]["pools_after_block"]
	assert replica_pool(last, standby)["created"] == 1
	assert replica_pool(last, standby)["checkouts"] == 60
	assert [p["created"] for p in last] == [1, 1]
	# a whitelisted method decorated with frappe.read_only: the standby, the same pooled session
	assert {code for code, _ in methods} == {200}
	for _, body in methods:
		assert body["message"]["who"]["pid"] == replica_pid and body["message"]["who"]["recovery"] is True
	assert {code for code, _ in counts} == {200}
	assert final["replica"]["pid"] == replica_pid and final["first"]["pid"] in primary_pids
	assert replica_pool(final["pools_after_block"], standby)["checkouts"] == 60 + 20 + 40 + 1
	assert [p["created"] for p in final["pools_after_block"]] == [1, 1]
	assert logins == 1  # 121 read_only blocks, one login on the standby
	print(
		f"\nreplica: 61 probe requests, 20 read_only methods, 40 get_count, 1 sync worker: "
		f"standby logins={logins}, process budget {final.get('budget', 'n/a')}, "
		f"replica backend {replica_pid}, primary backend {primary_pids}"
	)


def test_identities_never_cross_with_different_credentials_for_replica(standby, probe_module):
	sites = [SITE, *([SITE2] if SITE2 else [])]
	with contextlib.ExitStack() as stack:
		role, password = stack.enter_context(replica_role(standby))
		# the first site reads as the separate role; the second (if any) with its own credentials
		expected = {}
		for i, site in enumerate(sites):
			extra = (
				{
					"different_credentials_for_replica": 1,
					"replica_db_name": role,
					"replica_db_password": password,
				}
				if i == 0
				else {}
			)
			config = stack.enter_context(replica_config(standby, site, **extra))
			site_user = config.get("db_user") or config["db_name"]
			expected[site] = {"primary": site_user, "replica": role if i == 0 else site_user}
		web = stack.enter_context(Gunicorn(workers=2, threads=4))
		calls = [(f"/api/method/{PROBE}.probe", site, None) for _ in range(100) for site in sites]
		results = web.hammer(calls, concurrency=8)
		# one at a time afterwards: nothing is left checked out on either server, in either worker
		quiet = web.hammer(calls[: 10 * len(sites)], concurrency=1)
		# a wrong replica password is refused by the standby: the password really is the replica's
		write_site_config(sites[0], {**read_site_config(sites[0]), "replica_db_password": "wrong"})
		code, _ = web.request(f"/api/method/{PROBE}.probe", sites[0])
		assert code >= 500
	sessions = collections.defaultdict(set)  # backend pid -> every identity it served as
	for (_, site, _), (code, body) in zip(calls, results, strict=True):
		assert code == 200, body
		r = body["message"]
		assert r["replica"]["recovery"] is True and r["replica"]["user"] == expected[site]["replica"]
		assert r["first"]["recovery"] is False and r["first"]["user"] == expected[site]["primary"]
		assert r["after"] == r["first"]
		assert replica_pool(r["pools_after_block"], standby)["user"] == expected[site]["replica"]
		sessions[r["replica"]["pid"]].add(("replica", site, r["replica"]["user"]))
		sessions[r["first"]["pid"]].add(("primary", site, r["first"]["user"]))
	for _, body in quiet:
		pools = body["message"]["pools_after_block"]
		assert replica_pool(pools, standby)["in_use"] == 0
		assert [p["in_use"] for p in pools if p["port"] != str(standby.port)] == [1]  # the primary's
	assert all(len(kinds) == 1 for kinds in sessions.values()), sessions
	kinds = collections.Counter(next(iter(k))[0] for k in sessions.values())
	for _, body in quiet:  # sessions end by the pool's choice (idle, lifetime, budget), never as unusable
		for pool in body["message"]["pools_after_block"]:
			assert not {"reset_failed", "broken", "dead", "busy"} & set(pool["closed"]), pool
	print(f"\nreplica, different credentials: {len(calls)} requests on 2x4 threads, sessions {dict(kinds)}")


def test_a_write_inside_read_only_fails_as_in_plain_frappe_and_the_primary_is_untouched(
	standby, probe_module
):
	db = read_site_config(SITE)["db_name"]
	outcomes = {}
	with replica_config(standby, SITE) as config, Gunicorn(workers=1) as web:
		for pooled in (0, 1):
			write_site_config(SITE, {**read_site_config(SITE), "db_pool_enabled": pooled})
			marker = f"pgpool-{uuid.uuid4().hex[:10]}"
			r = probe(web, SITE, write=marker)
			outcomes[pooled] = r["replica"]["write"]
			assert r["replica"]["recovery"] is True
			# the primary: the same session before and after, its own uncommitted write still there
			assert r["after"]["pid"] == r["first"]["pid"] and r["after"]["recovery"] is False
			assert r["after"]["own_write_visible"] == 1
			if pooled:
				failed_on = r["replica"]["pid"]
				back = replica_pool(r["pools_after_block"], standby)
				assert back["in_use"] == 0 and back["idle"] == 1 and not back["closed"]
				# the next request reuses the rolled-back, reset replica session and the primary's
				again = probe(web, SITE)
				assert again["replica"]["pid"] == failed_on and again["first"]["pid"] == r["first"]["pid"]
		time.sleep(0.2)
		standby.wait_for_replay()
		left = standby.execute(
			"SELECT count(*) AS n FROM \"tabNote\" WHERE title LIKE 'pgpool-%%'", dbname=db
		)
	assert outcomes == {0: "InReadOnlyMode", 1: "InReadOnlyMode"}  # the pool changes nothing here
	assert left == [{"n": 0}]  # nothing of either write was committed anywhere
	assert config["db_name"] == db


def test_a_bench_script_read_only_block_swaps_and_returns(standby):
	"""frappe.read_only used directly in a script (bench execute, jobs): the same swap and return."""
	with replica_config(standby, SITE):
		(seen,) = run_in_bench(
			"""
			import frappe
			from frappe_pgpool.pool import registry
			def who():
				return frappe.db.sql("select pg_backend_pid(), pg_is_in_recovery()")[0]
			@frappe.read_only()
			def block():
				return who()
			rows = []
			for _ in range(20):
				frappe.init(site=SITE, force=True); frappe.connect()
				rows.append((who(), block(), who()))
				frappe.destroy()
			pools = [(k.port, p.snapshot()) for k, p in registry.pools().items()]
			out({"rows": rows, "pools": [(port, s["created"], s["in_use"], s["idle"]) for port, s in pools]})
			"""
		)
	rows = seen["rows"]
	assert all(first == after and not first[1] and replica[1] for first, replica, after in rows)
	assert len({replica[0] for _, replica, _ in rows}) == 1 and len({first[0] for first, _, _ in rows}) == 1
	assert sorted(p[1:] for p in seen["pools"]) == [[1, 0, 1], [1, 0, 1]]  # created, in use, idle
	assert str(standby.port) in {p[0] for p in seen["pools"]}


def test_a_replica_session_killed_while_idle_is_replaced_without_failing_the_request(standby, probe_module):
	db = read_site_config(SITE)["db_name"]
	with replica_config(standby, SITE), Gunicorn(workers=1) as web:
		before = probe(web, SITE)
		killed = before["replica"]["pid"]
		standby.execute("SELECT pg_terminate_backend(%s)", (killed,))
		while any(b["pid"] == killed for b in standby.backends(db)):
			time.sleep(0.02)
		after = probe(web, SITE)
	assert after["replica"]["recovery"] is True and after["replica"]["pid"] != killed
	assert after["first"]["pid"] == before["first"]["pid"]  # the primary's session is not touched
	pool = replica_pool(after["pools_after_block"], standby)
	assert pool["created"] == 2 and pool["closed"] == {"dead": 1} and pool["in_use"] == 0


def test_maintenance_mode_reads_from_the_replica_and_leaks_nothing(standby, probe_module):
	"""allow_reads_during_maintenance: Frappe swaps to the replica for the whole request and never
	swaps back, so frappe.destroy closes the replica only; a primary session opened through
	frappe.write_only is never closed by Frappe (plain Frappe leaves it to the garbage collector). The
	pool returns the replica's session and discards the abandoned primary one: nothing leaks."""
	with replica_config(standby, SITE, maintenance_mode=1, allow_reads_during_maintenance=1):
		with Gunicorn(workers=1) as web:
			results = [web.request(f"/api/method/{PROBE}.maintenance", SITE) for _ in range(10)]
	assert {code for code, _ in results} == {200}
	seen = [body["message"] for _, body in results]
	assert all(s["first"]["recovery"] is True and s["written"]["recovery"] is False for s in seen)
	assert len({s["first"]["pid"] for s in seen}) == 1  # one pooled replica session for every request
	last = {p["port"] == str(standby.port): p for p in seen[-1]["pools"]}
	assert last[True]["created"] == 1
	# the primary's: one per request, each abandoned by Frappe and discarded, never more than one open
	assert last[False]["created"] == 10 and last[False]["closed"] == {"discarded": 9}
	assert all(p["size"] <= 1 for s in seen for p in s["pools"])
