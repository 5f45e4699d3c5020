"""Operability without Frappe: reports, the table, Prometheus text, and the doctor's findings
against real pgBouncers configured wrong on purpose."""

from __future__ import annotations

import dataclasses
import re

import psycopg2
import pytest

from frappe_pgpool import bootstrap, doctor, observe, publish
from frappe_pgpool.doctor import checks
from frappe_pgpool.pool import PoolConfig
from frappe_pgpool.testing.cluster import PgBouncer

from .conftest import USERS, frappe_like_factory, key_for

PROM_LINE = re.compile(r'^[a-z_]+\{([a-z_]+="[^"]*",?)+\} -?[0-9.e+-]+$')


def test_reports_table_and_prometheus_from_a_real_pool(bouncer, registry):
	key = key_for(bouncer=bouncer, site="observed.local")
	config = PoolConfig(size=3)
	held = registry.getconn(key, config, frappe_like_factory(bouncer))
	registry.putconn(registry.getconn(key, config, frappe_like_factory(bouncer)))
	(report,) = observe.reports(registry, "observed.local")
	(pool,) = report["pools"]
	assert (pool["size"], pool["in_use"], pool["idle"], pool["checkouts"], pool["created"]) == (2, 1, 1, 2, 2)

	table = observe.render_table([report])
	assert "observed.local" not in table.splitlines()[0] and f"{report['pid']}" in table
	assert "total: 2/3 connections, 1 in use, 1 idle" in table

	text = observe.render_prometheus([report])
	samples = [line for line in text.splitlines() if not line.startswith("#")]
	assert all(PROM_LINE.match(line) for line in samples), samples
	assert (
		f'frappe_pgpool_connections{{site="observed.local",host="{report["host"]}",pid="{report["pid"]}",role="{report["role"]}",state="in_use"}} 1'
		in text
	)
	assert (
		"frappe_pgpool_connections_created_total" in text
		and "# TYPE frappe_pgpool_checkouts_total counter" in text
	)
	for secret in USERS.values():
		assert secret not in table and secret not in text
	registry.putconn(held)


def test_status_shows_hits_evictions_budget_and_armed_and_tolerates_old_reports(
	bouncer, registry, monkeypatch
):
	key = key_for(bouncer=bouncer, site="observed.local")
	registry.putconn(registry.getconn(key, PoolConfig(size=3), frappe_like_factory(bouncer)))
	# what the budget adds, where this version of the registry lacks it
	budget = {"process_budget": "auto", "limit": 2, "open": 1, "peak": 2, "evictions": 2}
	if not callable(getattr(registry, "snapshot", None)):
		monkeypatch.setattr(registry, "snapshot", lambda: budget, raising=False)
	(report,) = observe.reports(registry, "observed.local")
	# the test interpreter's real state: the package's .pth armed it at start (no Frappe loaded here)
	assert report["armed"] == bootstrap.armed() == "start"
	assert {"process_budget", "limit", "open", "peak"} <= set(report["budget"])
	new = {**report, "budget": budget, "armed": "hook"}  # rendered as a late-armed process publishes it
	new["pools"] = [{**report["pools"][0], "hits": 3, "misses": 1, "evictions": {"budget": 2, "idle": 1}}]
	old = {
		**{k: v for k, v in report.items() if k not in ("budget", "armed")},
		"pid": report["pid"] + 1,
		"pools": [{k: v for k, v in report["pools"][0].items() if k not in ("hits", "misses", "evictions")}],
	}

	table = observe.render_table([new, old])
	print("\n" + table)
	header, row_new, row_old, total = table.splitlines()
	assert "hit%" in header and "evicted (by reason)" in header and "open/limit/peak" in header
	assert (
		"75%" in row_new and "budget=2, idle=1" in row_new and "1/2/2 (auto)" in row_new and "hook" in row_new
	)
	assert "3 hits, 1 misses (75% hit rate); 3 evicted" in total
	assert row_old.count(" - ") >= 3  # no hits, evictions, budget, armed: dashes, no KeyError

	text = observe.render_prometheus([new, old])
	samples = [line for line in text.splitlines() if not line.startswith("#")]
	assert all(PROM_LINE.match(line) for line in samples), samples
	labels = f'site="observed.local",host="{report["host"]}",pid="{report["pid"]}",role="{report["role"]}"'
	assert f"frappe_pgpool_hits_total{{{labels}}} 3" in text
	assert f'frappe_pgpool_evictions_total{{{labels},reason="budget"}} 2' in text
	process = f'host="{report["host"]}",pid="{report["pid"]}",role="{report["role"]}"'
	assert f"frappe_pgpool_process_budget{{{process}}} 2" in text
	assert f"frappe_pgpool_process_connections_peak{{{process}}} 2" in text
	assert f'frappe_pgpool_process_armed{{{process},how="hook"}} 1' in text
	assert (
		f'pid="{old["pid"]}"' in text
		and "frappe_pgpool_hits_total{" + f'site="observed.local",host="{report["host"]}",pid="{old["pid"]}"'
		not in text
	)

	rated = observe.with_rates([new, old])
	assert rated[0]["pools"][0]["hit_rate"] == 0.75 and "hit_rate" not in rated[1]["pools"][0]


@pytest.mark.parametrize(
	("argv", "role"),
	[
		(["/bench/env/bin/gunicorn", "-w", "2", "frappe.app:application"], "web"),
		(["frappe.utils.bench_helper", "frappe", "worker", "--queue", "short"], "worker"),
		(["frappe.utils.bench_helper", "frappe", "schedule"], "scheduler"),
		(["frappe.utils.bench_helper", "frappe", "--site", "s", "execute", "x"], "other"),
	],
)
def test_process_role(argv, role):
	assert observe.process_role(argv) == role


# --- doctor: the whole bench against real pgBouncers and a real PostgreSQL ---


def pool_config(**settings) -> PoolConfig:
	return PoolConfig(enabled=True, **settings)


def through(bouncer: PgBouncer):
	"""A site's own connection, through pgBouncer (as its workers connect)."""
	return lambda: bouncer.connect("app1", USERS["app1"], connect_timeout=5)


def straight(cluster):
	return lambda: psycopg2.connect(
		host=cluster.host, port=cluster.port, user="app1", password=USERS["app1"], dbname="app1"
	)


def bench_of(sites: list[doctor.Site], web: int = 4, threads: int = 1, jobs: int = 3) -> doctor.Bench:
	return doctor.Bench(tuple(sites), web=web, threads=threads, jobs=jobs)


def behind(
	bouncer: PgBouncer, config: PoolConfig, count: int = 1, shared: bool = True, budget: object = None
) -> list[doctor.Site]:
	"""`count` sites behind `bouncer`: sharing database and user app1, or each with its own.

	budget: db_pool_process_budget ("auto", a number, or None for a frappe_pgpool without one)."""
	at = doctor.address(bouncer.host, bouncer.port)
	return [
		doctor.Site(
			"site1.local" if count == 1 else f"site{i:02d}.local",
			"app1" if shared else f"site{i:02d}",
			"app1" if shared else f"site{i:02d}",
			config,
			at,
			through(bouncer),
			budget,
		)
		for i in range(1, count + 1)
	]


def examine(bouncer: PgBouncer | None, bench: doctor.Bench, **kw) -> list[doctor.Finding]:
	bouncers = {}
	if bouncer is not None:

		def connect():
			return psycopg2.connect(admin_dsn(bouncer, bouncer.admin_password))

		bouncer.connect("app1", USERS["app1"]).close()  # SHOW DATABASES lists a database once used
		bouncers[doctor.address(bouncer.host, bouncer.port)] = connect
	found = doctor.examine(bench, bouncers, **kw)
	print("\n" + doctor.render(found))
	for secret in [*USERS.values(), PgBouncer.admin_password]:
		assert secret not in doctor.render(found)
	return found


def by_check(found: list[doctor.Finding]) -> dict[str, doctor.Finding]:
	"""The worst finding of each check."""
	rank = {"ok": 0, "warn": 1, "error": 2}
	worst: dict[str, doctor.Finding] = {}
	for f in found:
		if f.check not in worst or rank[f.level] > rank[worst[f.check].level]:
			worst[f.check] = f
	return worst


def test_doctor_passes_a_bench_sized_right(cluster):
	settings = dict(default_pool_size=20, max_client_conn=100, client_idle_timeout=0, server_lifetime=3600)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		bench = bench_of(behind(bouncer, pool_config(size=4)), web=4, threads=4, jobs=3)
		found = by_check(examine(bouncer, bench))
	assert {f.level for f in found.values()} == {"ok"}, found
	assert "19 clients at most for 20 server connections" in found["pool size"].message
	assert "4 web x 4 + 3 job x 1 = 19" in found["max_client_conn"].message
	assert "up to 19 backends" in found["max_connections"].message
	assert "max_connections=300 - superuser_reserved_connections=3 = 297" in found["max_connections"].message


def test_doctor_warns_when_a_workers_threads_exceed_db_pool_size(cluster):
	"""db_pool_size is what a process keeps per site (issue 23): a web worker with more threads serves the
	requests beyond it with connections opened and closed per request, as plain Frappe. Doctor says so, and
	counts those connections in what the bench can hold at once."""
	settings = dict(default_pool_size=20, max_client_conn=100, client_idle_timeout=0, server_lifetime=3600)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		bench = bench_of(behind(bouncer, pool_config(size=2)), web=4, threads=4, jobs=3)
		found = by_check(examine(bouncer, bench))
	size = found["db_pool_size"]
	assert size.level == "warn" and "db_pool_size=2 is below the 4 threads per web worker" in size.message
	assert "opened and closed per request, as plain Frappe" in size.message
	assert "set db_pool_size to 4" in size.fix
	# a worker's 4 threads may all run on the site at once: as many clients as with db_pool_size 4
	assert "4 web x 4 + 3 job x 1 = 19" in found["max_client_conn"].message
	assert {f.level for check, f in found.items() if check != "db_pool_size"} == {"ok"}, found


def test_doctor_finds_each_misconfiguration(cluster):
	settings = dict(
		pool_mode="transaction",
		default_pool_size=5,
		max_client_conn=10,
		client_idle_timeout=30,
		server_lifetime=300,
		server_login_retry=15,
	)
	config = pool_config(size=8, max_idle=60, max_lifetime=600)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		found = by_check(examine(bouncer, bench_of(behind(bouncer, config), web=4, threads=4, jobs=3)))
	assert found["pool_mode"].level == "warn" and "transaction" in found["pool_mode"].message
	assert "idle clients pin none" in found["pool_mode"].message
	assert 'set db_pool_pgbouncer_mode to "transaction"' in found["pool_mode"].fix
	assert "application_name per worker" in found["pool_mode"].fix  # pgBouncer SETs it per transaction
	assert found["max_client_conn"].level == "error" and "19" in found["max_client_conn"].fix
	assert (
		found["client_idle_timeout"].level == "warn"
		and "db_pool_max_idle to 24" in found["client_idle_timeout"].fix
	)
	assert found["server_login_retry"].level == "warn"
	# transaction mode: only transactions in flight (4 x 4 threads + 3) need a server; they may queue
	assert found["pool size"].level == "warn" and "19 transactions" in found["pool size"].message


def test_doctor_reads_a_users_own_pool_settings(cluster):
	"""Newer pgBouncers let a [users] entry set pool_size, reserve_pool_size and max_user_connections
	(1.24+ also client caps per database and user)
	ahead of the database's and the global ones, and SHOW USERS shows them (NULL where a size is unset,
	the effective max_user_connections). The pgBouncer here (1.18) has no such columns: its real rows are
	read, and those columns added to them as a newer pgBouncer shows them (its documented SHOW USERS and
	SHOW DATABASES columns)."""
	settings = dict(default_pool_size=20, max_client_conn=100, client_idle_timeout=0, server_lifetime=3600)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		bench = bench_of(behind(bouncer, pool_config(size=4)), web=4, threads=4, jobs=3)  # 19 clients
		bouncer.connect("app1", USERS["app1"]).close()  # SHOW DATABASES lists a database once used
		read = doctor.Bouncer.read(
			doctor.address(bouncer.host, bouncer.port),
			lambda: psycopg2.connect(admin_dsn(bouncer, bouncer.admin_password)),
		)

	def check(**columns) -> dict[str, doctor.Finding]:
		row = {"name": "app1", "pool_mode": None, "pool_size": None, "reserve_pool_size": None}
		users = {**read.users, "app1": {**row, "max_user_connections": "0", **columns}}
		return by_check(
			checks._check_bouncer(bench, dataclasses.replace(read, users=users), list(bench.sites))
		)

	assert check()["pool size"].level == "ok" and "19 clients at most for 20" in check()["pool size"].message
	small = check(pool_size="10", reserve_pool_size="2")["pool size"]
	assert small.level == "error" and "the pool has 10 server connections (+2 reserve)" in small.message
	assert "raise pool_size for user app1 (its [users] entry) to at least 19" in small.fix
	capped = check(max_user_connections="12")["max_user_connections"]
	assert capped.level == "error" and "19 server connections, but max_user_connections=12" in capped.message
	# newer versions name SHOW DATABASES' reserve column reserve_pool_size (1.18: reserve_pool)
	entry = {k: v for k, v in read.databases["app1"].items() if k != "reserve_pool"}
	renamed = dataclasses.replace(
		read, databases={**read.databases, "app1": {**entry, "reserve_pool_size": "3"}}
	)
	sites = list(bench.sites)
	assert (
		"19 clients at most for 23"
		in by_check(checks._check_bouncer(bench, renamed, sites))["pool size"].message
	)
	# 1.24+: client caps per database and per user, effective values in SHOW DATABASES / SHOW USERS
	assert "max_user_client_connections" not in check(max_user_client_connections="0")
	refused = check(max_user_client_connections="15")["max_user_client_connections"]
	assert refused.level == "error" and "19 clients, but max_user_client_connections=15" in refused.message
	assert "at least 19" in refused.fix
	capped_db = dataclasses.replace(
		read, databases={**read.databases, "app1": {**read.databases["app1"], "max_client_connections": "10"}}
	)
	db_refused = by_check(checks._check_bouncer(bench, capped_db, sites))["max_db_client_connections"]
	assert db_refused.level == "error" and "database app1" in db_refused.message


def test_doctor_warns_when_sites_disagree_on_the_process_budget(cluster):
	"""db_pool_process_budget is process-wide but read from each request's site: sites that disagree make
	every process switch budgets with each request. Spelled differently but equal is no disagreement."""
	config = pool_config(size=4)
	with PgBouncer(cluster, users=USERS) as bouncer:
		same = behind(bouncer, config, count=2, budget="auto") + behind(
			bouncer, config, count=1, budget=" Auto "
		)
		assert "db_pool_process_budget" not in by_check(examine(bouncer, bench_of(same)))
		mixed = [
			*behind(bouncer, config, count=2, budget="auto"),
			behind(bouncer, config, count=3, budget=4)[2],
		]
		found = by_check(examine(bouncer, bench_of(mixed)))
	warning = found["db_pool_process_budget"]
	assert warning.level == "warn" and "4 for site03.local" in warning.message
	assert "auto for site01.local, site02.local" in warning.message
	assert "common_site_config.json" in warning.fix


def test_doctor_matches_db_pool_pgbouncer_mode_to_the_pool_mode(cluster):
	"""transaction set for a site whose connections are real sessions (pgBouncer in session mode, or
	none): nothing resets them, so one request's session state reaches the next. An error."""
	config = pool_config(pgbouncer_mode="transaction")
	with PgBouncer(cluster, users=USERS, pool_mode="transaction") as bouncer:
		found = by_check(examine(bouncer, bench_of(behind(bouncer, config), web=2, jobs=1)))
	assert "db_pool_pgbouncer_mode" not in found  # as it should be
	assert "db_pool_pgbouncer_mode" not in found["pool_mode"].fix
	with PgBouncer(cluster, users=USERS) as bouncer:
		found = by_check(examine(bouncer, bench_of(behind(bouncer, config), web=2, jobs=1)))
	assert found["db_pool_pgbouncer_mode"].level == "error"
	assert "session mode" in found["db_pool_pgbouncer_mode"].message
	at = doctor.address(cluster.host, cluster.port)
	site = doctor.Site("site1.local", "app1", "app1", config, at, straight(cluster))
	found = by_check(examine(None, bench_of([site], web=2, jobs=1)))
	assert found["db_pool_pgbouncer_mode"].level == "error"
	assert "straight to PostgreSQL" in found["db_pool_pgbouncer_mode"].message


def test_doctor_finds_a_pool_too_small_for_session_mode(cluster):
	config = pool_config(size=8, max_lifetime=7200)
	with PgBouncer(cluster, users=USERS, default_pool_size=6, server_lifetime=3600) as bouncer:
		found = by_check(examine(bouncer, bench_of(behind(bouncer, config), web=3, threads=2, jobs=2)))
	assert found["pool size"].level == "error"
	assert "3 web x 2 + 2 job x 1 = 8 clients" in found["pool size"].message
	assert "at least 8" in found["pool size"].fix and "query_wait_timeout" in found["pool size"].message
	assert found["server_lifetime"].level == "warn" and "3600" in found["server_lifetime"].fix


def test_doctor_warns_when_pooled_clients_never_leave(cluster):
	with PgBouncer(cluster, users=USERS) as bouncer:
		found = by_check(
			examine(bouncer, bench_of(behind(bouncer, pool_config(max_lifetime=0)), web=1, jobs=1))
		)
	assert found["max_lifetime"].level == "warn" and "never finish" in found["max_lifetime"].message


def test_doctor_reports_an_unreachable_admin_console_without_secrets(cluster):
	with PgBouncer(cluster, users=USERS) as bouncer:

		def connect():
			return psycopg2.connect(bouncer.dsn("app1", USERS["app1"], "pgbouncer"))  # not an admin user

		bench = bench_of(behind(bouncer, pool_config()))
		found = doctor.examine(bench, {doctor.address(bouncer.host, bouncer.port): connect})
	finding = by_check(found)["admin console"]
	assert finding.level == "error" and "admin_users or stats_users" in finding.fix
	assert USERS["app1"] not in doctor.render(found)


def test_doctor_adds_up_the_sites_that_share_a_pgbouncer_pool(cluster):
	"""20 sites on one database and user, 4 sync workers: every worker keeps a connection per site."""
	with PgBouncer(cluster, users=USERS, default_pool_size=20) as bouncer:
		over = by_check(examine(bouncer, bench_of(behind(bouncer, pool_config(), count=20), web=4, jobs=3)))
		budgeted = behind(bouncer, pool_config(), count=20, budget="auto")
		right = by_check(examine(bouncer, bench_of(budgeted, web=4, jobs=3)))
	finding = over["pool size"]
	assert finding.level == "error", finding
	assert (
		"pgBouncer pool app1/app1, for 20 sites (site01.local, site02.local, ..., site20.local)"
		in finding.message
	)
	assert "4 web x 20 + 3 job x 20 = 140 clients, but the pool has 20 server connections" in finding.message
	assert "to at least 140" in finding.fix
	assert "db_pool_process_budget to auto" in finding.fix and "4 web x 1 + 3 job x 1 = 7" in finding.fix
	assert right["pool size"].level == "ok" and "7 clients at most for 20" in right["pool size"].message
	assert {f.level for f in right.values()} == {"ok"}, right


def test_doctor_adds_up_every_pgbouncer_pool_of_a_postgresql_server(cluster):
	"""20 sites, each its own database and user: each pool fits pgBouncer, all of them not PostgreSQL."""
	with PgBouncer(cluster, users=USERS, default_pool_size=20) as bouncer:
		sites = behind(bouncer, pool_config(size=8), count=20, shared=False)
		over = by_check(examine(bouncer, bench_of(sites, web=4, threads=4, jobs=3)))
		budgeted = behind(bouncer, pool_config(size=8), count=20, shared=False, budget="auto")
		right = by_check(examine(bouncer, bench_of(budgeted, web=4, threads=4, jobs=3)))
	assert over["pool size"].level == "ok" and "20 pgBouncer pools fit" in over["pool size"].message
	finding = over["max_connections"]
	assert finding.level == "error", finding
	assert "this bench can open up to 380 backends" in finding.message
	assert "pgBouncer localhost:" in finding.message and "20 pools may open 380" in finding.message
	assert "max_connections=300 - superuser_reserved_connections=3 = 297" in finding.message
	assert (
		"max_connections to at least 383" in finding.fix and "db_pool_process_budget to auto" in finding.fix
	)
	assert "up to 19" in finding.fix
	assert right["max_connections"].level == "ok" and "up to 19 backends" in right["max_connections"].message


def test_doctor_checks_a_bench_without_pgbouncer_against_max_connections(cluster):
	"""Workers straight to PostgreSQL: every connection a process keeps is a backend."""
	at = doctor.address(cluster.host, cluster.port)

	def sites(config, count, budget=None):
		return [
			doctor.Site(f"site{i:02d}.local", "app1", "app1", config, at, straight(cluster), budget)
			for i in range(1, count + 1)
		]

	over_all = examine(None, bench_of(sites(pool_config(), 20), web=4, threads=4, jobs=3))
	over = by_check(over_all)
	small = by_check(examine(None, bench_of(sites(pool_config(), 2), web=4, threads=4, jobs=3)))
	budgeted = by_check(examine(None, bench_of(sites(pool_config(), 20, "auto"), web=4, threads=4, jobs=3)))
	finding = over["max_connections"]
	assert finding.level == "error", finding
	assert "each connection a backend: 4 web x 80 + 3 job x 20 = 380" in finding.message
	assert "accepts 297 (max_connections=300 - superuser_reserved_connections=3 = 297)" in finding.message
	assert "put pgBouncer in front" in finding.fix and "up to 19" in finding.fix
	assert "no pgBouncer examined in front of 20 sites" in doctor.render(
		[f for f in over_all if f.check == "checked"]
	)
	assert "pgbouncer" not in over  # its port is PostgreSQL's: nothing in between
	assert small["max_connections"].level == "ok" and "up to 38 backends" in small["max_connections"].message
	assert (
		budgeted["max_connections"].level == "ok"
		and "up to 19 backends" in budgeted["max_connections"].message
	)


def test_doctor_notices_a_pgbouncer_it_was_not_given(cluster, bouncer):
	found = by_check(examine(None, bench_of(behind(bouncer, pool_config()))))
	assert (
		found["pgbouncer"].level == "warn"
		and f"PostgreSQL listens on port {cluster.port}" in found["pgbouncer"].message
	)
	assert "pgbouncer_admin_dsn" in found["pgbouncer"].fix


def test_server_limit_counts_the_reserved_connections():
	server = doctor.Server("x", "db:5432", "16.4", 100, 3, 5, 0, 0.0, 5432)
	assert server.limit == 92
	assert server.limit_text.endswith("- reserved_connections=5 = 92")


def test_doctor_reports_processes_not_armed_at_interpreter_start():
	def report(pid, **extra):
		return {"site": "s", "host": "vm", "pid": pid, "role": "web", "pools": [], **extra}

	reports = [report(1, armed="start"), report(2, armed="hook"), report(3, armed="no"), report(4)]
	(finding,) = doctor.check_processes([*reports, report(2, armed="hook", site="t")])
	assert finding.level == "error" and "2 of 4 live processes" in finding.message
	assert "web 2@vm (hook)" in finding.message and "web 3@vm (no)" in finding.message
	assert "pip install / bench get-app, then restart" in finding.fix
	(finding,) = doctor.check_processes([report(1, armed="start"), report(4)])
	assert finding.level == "ok" and "1 do not say" in finding.message
	assert doctor.check_processes([]) == []


# --- secrets: DSNs and libpq errors are shown redacted, and the admin DSN need not be in argv ---


def examine_with(connect, bouncer: PgBouncer, bench: doctor.Bench) -> list[doctor.Finding]:
	return doctor.examine(bench, {doctor.address(bouncer.host, bouncer.port): connect})


def admin_dsn(bouncer: PgBouncer, password: str | None = None) -> str:
	dsn = f"host={bouncer.host} port={bouncer.port} dbname=pgbouncer user={bouncer.admin_user}"
	return dsn if password is None else f"{dsn} password={password}"


@pytest.mark.parametrize(
	("template", "fragment"),
	[
		(
			"host={host} port={port} dbname=pgbouncer user=pgbadmin password=first-half second-half",
			"second-half",
		),
		("host={host} port={port} dbname=pgbouncer user=pgbadmin password=pw sneakytail=1", "sneakytail"),
		("postgresql://pgbadmin:s3cr%zzet@{host}:{port}/pgbouncer", "s3cr"),
		("postgresql://pgbadmin:hunter2@[::1:{port}/pgbouncer", "hunter2"),
		("postgresql://pgbadmin@{host}:{port}/pgbouncer?password=hunter3&bogus=1", "hunter3"),
		("host={host} port={port} dbname=pgbouncer user=pgbadmin password='no end quote", "no end"),
	],
)
def test_doctor_never_echoes_a_bad_dsn(bouncer, template, fragment):
	dsn = template.format(host=bouncer.host, port=bouncer.port)
	found = examine_with(lambda: psycopg2.connect(dsn), bouncer, bench_of(behind(bouncer, pool_config())))
	text = doctor.render(found)
	print("\n" + text)
	assert by_check(found)["admin console"].level == "error"
	shown = doctor.ResolvedDsn(dsn, "test").shown
	assert fragment not in shown, shown
	assert fragment not in text and "invalid" in text


@pytest.mark.parametrize(
	("text", "secret", "kept"),
	[
		("redis://:redispw@10.0.0.5:6379/0", "redispw", "10.0.0.5:6379/0"),
		("postgresql://stats:pw-uri@10.0.0.5:6432/pgbouncer", "pw-uri", "10.0.0.5:6432/pgbouncer"),
		("postgres://stats@10.0.0.5/pgbouncer?sslmode=require&password=pw-q&x=1", "pw-q", "sslmode=require"),
		("postgresql:///pgbouncer?host=/run/pg&password=pw-q2", "pw-q2", "host=/run/pg"),
		("host=10.0.0.5 port=6432 dbname=pgbouncer user=stats password=pw-kw", "pw-kw", "user=stats"),
		(
			"host=10.0.0.5 password = 'pw with spaces \\' and quote' dbname=pgbouncer",
			"spaces",
			"dbname=pgbouncer",
		),
		("cannot connect (host=h password=pw-in-error): refused", "pw-in-error", "refused"),
		("host=10.0.0.5 sslkey=/k sslpassword=pw-sslkey dbname=pgbouncer", "pw-sslkey", "dbname=pgbouncer"),
		(
			"postgresql://stats@10.0.0.5/pgbouncer?sslpassword=pw-sslq&sslmode=verify-full",
			"pw-sslq",
			"verify",
		),
	],
)
def test_redacted_hides_passwords_of_uri_and_keyword_dsns(text, secret, kept):
	shown = publish.redacted(text)
	assert secret not in shown and kept in shown and "***" in shown, shown


def test_admin_dsn_from_environment_config_passfile_or_prompt(bouncer, tmp_path, monkeypatch):
	bench = bench_of(behind(bouncer, pool_config()))
	with_password = admin_dsn(bouncer, bouncer.admin_password)
	sources = [
		({"PGPOOL_ADMIN_DSN": with_password}, {}, None, "PGPOOL_ADMIN_DSN"),
		({}, {"pgbouncer_admin_dsn": with_password}, None, "pgbouncer_admin_dsn"),
		(
			{},
			{"pgbouncer_admin_dsn": admin_dsn(bouncer)},
			lambda: bouncer.admin_password,
			"pgbouncer_admin_dsn + prompt",
		),
	]
	for environ, conf, ask, source in sources:
		resolved = doctor.resolve_admin_dsn(None, conf, environ, ask=ask)
		assert resolved.source == source and not resolved.findings, resolved
		found = examine_with(resolved.connect, bouncer, bench)
		assert not [f for f in found if f.check == "admin console"], doctor.render(found)
		assert bouncer.admin_password not in resolved.shown + repr(resolved.findings)

	# libpq's own: the DSN without a password, the password in a passfile
	passfile = tmp_path / "pgpass"
	passfile.write_text(
		f"{bouncer.host}:{bouncer.port}:pgbouncer:{bouncer.admin_user}:{bouncer.admin_password}\n"
	)
	passfile.chmod(0o600)
	monkeypatch.setenv("PGPASSFILE", str(passfile))
	resolved = doctor.resolve_admin_dsn(None, {"pgbouncer_admin_dsn": admin_dsn(bouncer)}, {})
	found = examine_with(resolved.connect, bouncer, bench)
	assert not [f for f in found if f.check == "admin console"], doctor.render(found)

	# in argv: works, with a warning that names the ways to keep it out
	resolved = doctor.resolve_admin_dsn(with_password, {}, {})
	(warning,) = resolved.findings
	assert warning.level == "warn" and "ps" in warning.message and "PGPOOL_ADMIN_DSN" in warning.fix
	assert bouncer.admin_password not in doctor.render(resolved.findings) + resolved.shown
	assert not doctor.resolve_admin_dsn(admin_dsn(bouncer), {}, {}).findings  # no password, no warning
