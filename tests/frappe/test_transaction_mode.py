"""Frappe behind pgBouncer in transaction mode, pool off vs on, on the real bench.

With db_pool_pgbouncer_mode "transaction" the return sends only the rollback. What matters there is that
pgBouncer gets each server back clean: plain Frappe disconnects inside a transaction, and pgBouncer then
closes that server, so every request costs a new PostgreSQL backend as well as a login.
"""

from __future__ import annotations

import uuid

import pytest

from .bench import SITE, requires_bench
from .e2e import (
	Gunicorn,
	failed_write_rolls_back_and_commits_are_seen,
	read_site_config,
	sites_behind_pgbouncer,
	status,
	write_site_config,
)
from .test_e2e import TOKEN_SCRIPT

pytestmark = [pytest.mark.frappe, requires_bench]


@pytest.fixture(scope="module")
def env():
	from .bench import run_in_bench

	token = run_in_bench(TOKEN_SCRIPT, site=SITE)[0]
	with sites_behind_pgbouncer(
		[SITE], pool_mode="transaction", extra={"db_pool_pgbouncer_mode": "transaction"}
	) as (bouncer, upstream):
		yield {"bouncer": bouncer, "upstream": upstream, "token": token}


def sessions(upstream, db: str) -> int:
	"""PostgreSQL backends ever started for the database (pg_stat_database.sessions, PostgreSQL 14+)."""
	return int(upstream.query("SELECT sessions FROM pg_stat_database WHERE datname = %s", (db,))[0][0])


def run(web: Gunicorn, token: str) -> list[int]:
	calls = [("/api/method/ping", SITE, None)] * 150 + [("/api/resource/ToDo", SITE, token)] * 150
	return [code for code, _ in web.hammer(calls, concurrency=4)]


def test_pool_on_logs_in_once_per_worker_and_starts_no_backend_per_request(env):
	bouncer, upstream, token = env["bouncer"], env["upstream"], env["token"]
	db = read_site_config(SITE)["db_name"]
	config = read_site_config(SITE)
	figures = {}
	try:
		for label, enabled in (("off", 0), ("on", 1)):
			write_site_config(SITE, {**config, "db_pool_enabled": enabled})
			with Gunicorn(workers=2) as web:
				web.hammer([("/api/method/ping", SITE, None)] * 10, concurrency=2)
				web.each_worker(SITE, token)  # warm: every worker has served (the kernel picks who accepts)
				logins, backends = bouncer.logins(db), sessions(upstream, db)
				codes = run(web, token)
				figures[label] = {
					"ok": codes.count(200),
					"logins": bouncer.logins(db) - logins,
					"new backends": sessions(upstream, db) - backends,
				}
				if enabled:
					pools = status(web, SITE, token)["pools"]
	finally:
		write_site_config(SITE, config)
	print(f"\ntransaction mode, 300 requests, 2 sync workers: {figures}")
	assert figures["off"]["ok"] == figures["on"]["ok"] == 300
	assert figures["off"]["logins"] >= 300  # plain Frappe: a login per request
	assert figures["on"]["logins"] == 0  # both workers logged in during the warm-up
	# plain Frappe leaves inside a transaction, so pgBouncer throws that server away
	assert figures["off"]["new backends"] >= 250
	assert figures["on"]["new backends"] <= 2
	assert all(p["closed"].get("reset_failed", 0) == 0 for p in pools)


def test_writes_commit_and_failures_roll_back(env):
	with Gunicorn(workers=1) as web:
		failed_write_rolls_back_and_commits_are_seen(
			web, SITE, env["token"], f"pgpool-tx-{uuid.uuid4().hex[:10]}"
		)


def test_the_server_session_keeps_plain_frappes_application_name(env):
	"""pgBouncer applies a client's application_name to the server it lends with a SET before the
	transaction whenever the server's differs: a name per worker would cost a round trip per transaction
	when workers share servers. Behind transaction mode the pool sends none, as plain Frappe."""
	token = env["token"]
	config = read_site_config(SITE)
	names = {}
	try:
		for label, enabled in (("off", 0), ("on", 1)):
			write_site_config(SITE, {**config, "db_pool_enabled": enabled})
			with Gunicorn(workers=2) as web:
				web.hammer([("/api/method/ping", SITE, None)] * 20, concurrency=2)
				answers = [status(web, SITE, token) for _ in range(6)]
				names[label] = {a["application_name"] for a in answers}
	finally:
		write_site_config(SITE, config)
	print(f"\napplication_name on the server, transaction mode: {names}")
	assert names["on"] == names["off"] and not any(n.startswith("frappe:") for n in names["on"])
	# served pooled, by kept connections
	assert all(a["patch_installed"] and a["budget"]["keeping"] for a in answers)
	assert sum(p["hits"] for p in answers[-1]["pools"]) > 0
