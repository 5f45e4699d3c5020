"""doctor for many sites behind pgBouncer in transaction mode, against a real pgBouncer and PostgreSQL.

With db_pool_process_clients set (opt-in), a process keeps a client per site it served lately, so the clients add up
over every process of the bench (max_client_conn, and the per-database/per-user client caps where the
version has them); and each pool keeps the servers its kept clients gave back until server_idle_timeout,
so the servers add up over every pool of a PostgreSQL server (its max_connections). Unset, transaction-mode
pools keep what db_pool_process_budget allows (plain Frappe's peak) and doctor says what opting in costs.
"""

from __future__ import annotations

import dataclasses

import psycopg2

from frappe_pgpool import doctor
from frappe_pgpool.pool import PoolConfig
from frappe_pgpool.testing.cluster import PgBouncer

from .conftest import USERS
from .test_operability import admin_dsn, behind, bench_of, by_check, examine, pool_config

TX = pool_config(size=8, pgbouncer_mode="transaction")


def tx_sites(bouncer: PgBouncer, count: int, clients: object = 100) -> list[doctor.Site]:
	"""`count` sites with their own database and user, pooled in transaction mode, with the client budget
	db_pool_process_clients ("auto": off, the default; None: a frappe_pgpool without it)."""
	return [
		dataclasses.replace(s, process_budget="auto", process_clients=clients)
		for s in behind(bouncer, TX, count=count, shared=False)
	]


def test_doctor_adds_up_the_kept_clients_of_every_process_against_max_client_conn(cluster):
	"""20 sites, 4 sync web workers and 3 job processes: each process keeps a client per site (7 x 20)."""
	settings = dict(pool_mode="transaction", default_pool_size=2, max_client_conn=100, max_db_connections=2)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		over = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 20), web=4, jobs=3)))
		fewer = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 20, clients=10), web=4, jobs=3)))
		# a frappe_pgpool without the client budget: its process budget (auto) keeps one per process
		old = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 20, clients=None), web=4, jobs=3)))
	finding = over["max_client_conn"]
	assert finding.level == "error", finding
	assert "4 web x 20 + 3 job x 20 = 140 clients" in finding.message
	assert "max_client_conn=100" in finding.message
	assert "raise max_client_conn to at least 140" in finding.fix
	assert "set db_pool_process_clients to 14" in finding.fix and "7 processes x 14" in finding.fix
	assert fewer["max_client_conn"].level == "ok"
	assert "4 web x 10 + 3 job x 10 = 70" in fewer["max_client_conn"].message
	assert (
		old["max_client_conn"].level == "ok" and "4 web x 1 + 3 job x 1 = 7" in old["max_client_conn"].message
	)


def test_doctor_adds_up_the_servers_every_transaction_pool_keeps_against_max_connections(cluster):
	"""20 sites, 4 gthread workers x 4 threads and 3 job processes: a site may run 19 transactions at
	once, and its pool keeps what it needed until server_idle_timeout: 20 x 19 = 380 servers, over
	PostgreSQL's 297; capped per pool at 297 // 20 = 14 they fit."""
	base = dict(pool_mode="transaction", default_pool_size=20, server_idle_timeout=60)
	with PgBouncer(cluster, users=USERS, **base) as bouncer:
		over_all = examine(bouncer, bench_of(tx_sites(bouncer, 20), web=4, threads=4, jobs=3))
	over = by_check(over_all)
	with PgBouncer(cluster, users=USERS, max_db_connections=14, **base) as bouncer:
		capped = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 20), web=4, threads=4, jobs=3)))
	finding = over["max_connections"]
	assert finding.level == "error", finding
	# 20 x 19 kept, and up to 19 more at once that ending clients' BEGINs may have pgBouncer start
	assert "this bench can open up to 399 backends" in finding.message
	assert "max_connections=300 - superuser_reserved_connections=3 = 297" in finding.message
	assert "cap each of the 20 transaction-mode pools at 14 servers" in finding.fix
	assert "max_db_connections=14" in finding.fix and "20 x 14 = 280 fit the 297 backends left" in finding.fix
	idle = over["server_idle_timeout"]
	assert idle.level == "ok" and "20 pools in transaction mode with kept clients" in idle.message
	assert "19 at most" in idle.message and "server_idle_timeout=60s: up to 399 servers" in idle.message
	assert capped["max_connections"].level == "ok", capped["max_connections"]
	assert "up to 280 backends" in capped["max_connections"].message
	# the cap makes a busy site's transactions queue in pgBouncer, not fail
	assert capped["max_db_connections"].level == "warn"
	assert "up to 19 transactions at once, but max_db_connections=14" in capped["max_db_connections"].message


def test_doctor_counts_min_pool_size_and_warns_when_idle_servers_never_go(cluster):
	"""Sync workers: 7 transactions at once at most per site, but min_pool_size=10 keeps 10 per pool."""
	settings = dict(pool_mode="transaction", default_pool_size=20, min_pool_size=10, server_idle_timeout=0)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		found = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 20), web=4, jobs=3)))
	assert found["max_connections"].level == "ok" and "up to 200 backends" in found["max_connections"].message
	idle = found["server_idle_timeout"]
	assert idle.level == "warn" and "never (server_idle_timeout=0)" in idle.message
	assert "set server_idle_timeout" in idle.fix


def test_doctor_says_when_no_pgbouncer_setting_fits_one_server_per_site(cluster):
	"""300 sites with their own database and user: each busy pool needs a server, 300 > 297."""
	settings = dict(pool_mode="transaction", default_pool_size=1, max_client_conn=5000)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		found = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 300), web=4, jobs=3)))
	finding = found["max_connections"]
	assert finding.level == "error" and "up to 300 backends" in finding.message
	assert "no pgBouncer setting fits: 300 transaction-mode pools" in finding.fix
	assert "raise max_connections to at least 303" in finding.fix
	assert "cap each of" not in finding.fix
	assert "lower pgBouncer's pool sizes" not in finding.fix  # after "no pgBouncer setting fits"
	# names in natural order: the last of site01..site300 is site300, not site99
	assert "site01.local, site02.local, ..., site300.local" in found["pool_mode"].message


def test_session_mode_and_plain_sites_keep_todays_rule(cluster):
	"""Session mode: the process budget (auto) still bounds what is kept; plain Frappe sites in
	transaction mode: servers only for the requests in flight (they disconnect inside the transaction)."""
	with PgBouncer(cluster, users=USERS, default_pool_size=20) as bouncer:
		sites = [
			dataclasses.replace(s, process_budget="auto", process_clients="auto")
			for s in behind(bouncer, pool_config(size=8), count=20, shared=False)
		]
		session = by_check(examine(bouncer, bench_of(sites, web=4, threads=4, jobs=3)))
	assert (
		session["max_connections"].level == "ok" and "up to 19 backends" in session["max_connections"].message
	)
	assert "server_idle_timeout" not in session
	with PgBouncer(cluster, users=USERS, pool_mode="transaction", default_pool_size=20) as bouncer:
		plain = [dataclasses.replace(s, config=PoolConfig()) for s in tx_sites(bouncer, 20)]
		found = by_check(examine(bouncer, bench_of(plain, web=4, threads=4, jobs=3)))
	assert found["max_connections"].level == "ok" and "up to 19 backends" in found["max_connections"].message


def test_by_default_doctor_counts_the_peak_rule_and_says_what_opting_in_costs(cluster):
	"""db_pool_process_clients unset: each process keeps at most its peak (one per thread) across the 20
	sites, as in session mode, so the clients and servers fit; doctor offers the client budget with the
	servers it would keep idle (20 pools x up to 5 transactions at once = 100 here)."""
	settings = dict(pool_mode="transaction", default_pool_size=5, max_client_conn=100)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		found = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 20, clients="auto"), web=4, jobs=3)))
	assert found["max_client_conn"].level == "ok"
	assert "4 web x 1 + 3 job x 1 = 7" in found["max_client_conn"].message
	# 7 transactions at once, and up to 7 servers more that ending clients' BEGINs may have pgBouncer start
	assert found["max_connections"].level == "ok" and "up to 14 backends" in found["max_connections"].message
	offer = found["client budget"]
	assert offer.level == "ok" and "under db_pool_process_budget" in offer.message
	assert "up to 100 servers" in offer.message and "accepts 100 more backends" in offer.fix
	assert "run doctor with --apply" in offer.fix
	assert "server_idle_timeout" not in found  # no kept client per site: no idle servers of its own


def test_doctor_counts_the_servers_ending_clients_may_start_per_transaction_pool(cluster):
	"""Peak rule (the default), 4 sync web workers behind transaction mode: 4 transactions at once, and a
	kept client's end sends BEGIN so that pgBouncer drops the idle server its last return left; where
	that pool has none idle then, pgBouncer starts one for the BEGIN, below the pool's cap: one more per
	thread at once (the sites benchmark measured 5 servers for 4 sync workers, 10 for 2x4 gthread)."""
	settings = dict(pool_mode="transaction", default_pool_size=20, max_client_conn=1000)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		twenty = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 20, clients="auto"), web=4, jobs=0)))
		one = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 1, clients="auto"), web=4, jobs=0)))
		three = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 3, clients="auto"), web=4, jobs=0)))
		plain = [dataclasses.replace(s, config=PoolConfig()) for s in tx_sites(bouncer, 20)]
		unpooled = by_check(examine(bouncer, bench_of(plain, web=4, jobs=0)))
	with PgBouncer(cluster, users=USERS, max_db_connections=1, **settings) as bouncer:
		capped = by_check(examine(bouncer, bench_of(tx_sites(bouncer, 300, clients="auto"), web=4, jobs=3)))
	assert "20 pools may open 8" in twenty["max_connections"].message, twenty["max_connections"]
	assert "1 pool may open 5" in one["max_connections"].message, one["max_connections"]  # within its 20
	assert "3 pools may open 7" in three["max_connections"].message, three["max_connections"]  # 4 + 3 pools
	# plain Frappe ends no kept client: its transactions only
	assert "up to 4 backends" in unpooled["max_connections"].message, unpooled["max_connections"]
	# 300 pools capped at 1 server: 7 transactions and up to 7 ending clients' servers
	assert "300 pools may open 14" in capped["max_connections"].message, capped["max_connections"]


def test_doctor_warns_when_sites_disagree_on_db_pool_process_clients(cluster):
	"""db_pool_process_clients is process-wide but read from each request's site: one site setting it in
	its own site_config.json makes every process switch the client budget on and off, closing its kept
	clients at each switch. "auto", unset and a bad value are all off: no disagreement among them."""
	with PgBouncer(cluster, users=USERS, pool_mode="transaction") as bouncer:
		sites = tx_sites(bouncer, 4, clients="auto")
		same = [sites[0], dataclasses.replace(sites[1], process_clients=None), sites[2]]
		assert "db_pool_process_clients" not in by_check(examine(bouncer, bench_of(same)))
		mixed = [*sites[:3], dataclasses.replace(sites[3], process_clients=100)]
		warning = by_check(examine(bouncer, bench_of(mixed)))["db_pool_process_clients"]
	assert warning.level == "warn" and "the sites disagree on db_pool_process_clients" in warning.message
	assert "100 for site04.local" in warning.message and "auto for site01.local" in warning.message
	assert "common_site_config.json" in warning.fix


def advise(bouncer: PgBouncer | None, bench: doctor.Bench, **kw) -> doctor.ClientsAdvice:
	"""What `doctor --apply` would set, with pgBouncer's admin console when `bouncer` is given."""
	bouncers = {}
	if bouncer is not None:
		examine(bouncer, bench)  # the same bench checked as doctor shows it (and SHOW DATABASES primed)
		bouncers[doctor.address(bouncer.host, bouncer.port)] = lambda: psycopg2.connect(
			admin_dsn(bouncer, bouncer.admin_password)
		)
	advice = doctor.advise_process_clients(bench, bouncers, **kw)
	print(advice)
	for secret in [*USERS.values(), PgBouncer.admin_password]:
		assert secret not in repr(advice)
	return advice


def test_apply_sets_a_client_per_site_where_every_check_accepts_it(cluster):
	"""20 sites, pool size and max_db_connections 2: 20 x 2 = 40 servers at most, 7 x 20 clients."""
	settings = dict(pool_mode="transaction", default_pool_size=2, max_db_connections=2, max_client_conn=1000)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		advice = advise(bouncer, bench_of(tx_sites(bouncer, 20, clients="auto"), web=4, jobs=3))
	assert advice.value == 20, advice
	assert not advice.refused
	accepted = {f.check: f for f in advice.accepted}
	assert "4 web x 20 + 3 job x 20 = 140" in accepted["max_client_conn"].message
	assert "up to 40 backends" in accepted["max_connections"].message


def test_apply_lowers_the_client_budget_to_the_most_the_client_cap_accepts(cluster):
	"""max_client_conn=100 refuses 7 processes x 20 clients (140) and accepts 7 x 14 (98), not 7 x 15."""
	settings = dict(pool_mode="transaction", default_pool_size=2, max_db_connections=2, max_client_conn=100)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		advice = advise(bouncer, bench_of(tx_sites(bouncer, 20, clients="auto"), web=4, jobs=3))
	assert advice.value == 14, advice
	assert "4 web x 14 + 3 job x 14 = 98" in {f.check: f for f in advice.accepted}["max_client_conn"].message


def test_apply_leaves_the_client_budget_off_where_the_servers_would_not_fit(cluster):
	"""20 sites x 19 transactions at once (4 gthread x 4 threads + 3 jobs), pools of 20 and no cap: 380
	servers, over PostgreSQL's 297. Fewer kept clients would not change it: off, with the cap to set."""
	settings = dict(pool_mode="transaction", default_pool_size=20, max_client_conn=5000)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		bench = bench_of(tx_sites(bouncer, 20, clients="auto"), web=4, threads=4, jobs=3)
		advice = advise(bouncer, bench)
	assert advice.value is None and advice.decided, advice  # it does not fit: --apply removes the key
	assert [f.check for f in advice.refused] == ["max_connections"]
	assert "db_pool_process_clients=20" in advice.reason and "399 backends" in advice.reason
	assert "cap each of the 20 transaction-mode pools at 14 servers" in advice.fix


def test_apply_needs_the_admin_console_and_a_site_in_transaction_mode(cluster):
	with PgBouncer(cluster, users=USERS, pool_mode="transaction") as bouncer:
		blind = advise(None, bench_of(tx_sites(bouncer, 3, clients="auto")))
		session = [dataclasses.replace(s, config=pool_config(size=8)) for s in tx_sites(bouncer, 3)]
		none = advise(bouncer, bench_of(session))
	assert (
		blind.value is None and not blind.decided and blind.applies
	)  # cannot tell: --apply leaves the key as it is
	assert "no pgBouncer admin console examined" in blind.reason and "pgbouncer_admin_dsn" in blind.fix
	assert none.value is None and not none.decided and not none.applies
	assert "no pooled site is in pgBouncer transaction mode" in none.reason


def test_apply_decides_nothing_when_a_count_is_missing_or_already_wrong(cluster):
	"""Cannot tell, so the key is left as it is: PostgreSQL's max_connections not read (no credentials
	that read it), a site overriding the key in its own site_config.json (the written value would not
	reach it), a site left out of the count for a bad setting, or doctor's errors with the key off."""
	settings = dict(pool_mode="transaction", default_pool_size=2, max_db_connections=2, max_client_conn=1000)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		sites = tx_sites(bouncer, 20, clients="auto")
		unread = advise(bouncer, bench_of([dataclasses.replace(s, connect=None) for s in sites]))
		overridden = advise(bouncer, bench_of(sites), overriding=["site03.local"])
		bad = doctor.Finding("error", "site config", "site21.local: db_pool_size: not a number")
		skipped = advise(bouncer, bench_of(sites), known=[bad])
	with PgBouncer(cluster, users=USERS, **{**settings, "max_client_conn": 5}) as bouncer:
		# 7 processes x 1 client > 5 with the client budget off: not the value's doing
		wrong = advise(bouncer, bench_of(tx_sites(bouncer, 20, clients="auto"), web=4, jobs=3))
	for advice in (unread, overridden, skipped, wrong):
		assert advice.value is None and not advice.decided, advice
	assert "PostgreSQL not checked" in unread.reason
	assert "site03.local set db_pool_process_clients in their own site_config.json" in overridden.reason
	assert "site21.local: db_pool_size" in skipped.reason
	assert "errors with the client budget off" in wrong.reason and "max_client_conn" in wrong.reason
