"""Faults under real Frappe: after pgBouncer restarts, backends are terminated or pgBouncer KILLs
its clients, the next requests of workers holding pooled (now dead) connections all succeed."""

from __future__ import annotations

import signal
import time

import pytest

from .bench import SITE, requires_bench, run_in_bench
from .e2e import Gunicorn, read_site_config, sites_behind_pgbouncer, write_site_config
from .test_e2e import TOKEN_SCRIPT

pytestmark = [pytest.mark.frappe, requires_bench]


@pytest.fixture(scope="module")
def env():
	token = run_in_bench(TOKEN_SCRIPT, site=SITE)[0]
	with sites_behind_pgbouncer([SITE]) as (bouncer, upstream):
		yield {"bouncer": bouncer, "upstream": upstream, "token": token}


@pytest.mark.parametrize("fault", ["pgbouncer SIGTERM restart", "pg_terminate_backend", "pgbouncer KILL"])
def test_no_request_fails_after_the_fault(env, fault):
	bouncer, upstream, token = env["bouncer"], env["upstream"], env["token"]
	db = read_site_config(SITE)["db_name"]
	with Gunicorn(workers=2) as web:
		warm = web.hammer([("/api/method/ping", SITE, None)] * 50, concurrency=4)
		assert {code for code, _ in warm} == {200}  # both workers now hold a pooled connection
		if fault == "pgbouncer SIGTERM restart":
			bouncer.restart(signal.SIGTERM)
		elif fault == "pg_terminate_backend":
			upstream.query(
				"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
				"WHERE datname = %s AND backend_type = 'client backend'",
				(db,),
			)
		else:
			bouncer.admin(f"KILL {db}")
			bouncer.admin(f"RESUME {db}")
		time.sleep(0.5)
		results = web.hammer([("/api/resource/ToDo", SITE, token)] * 200, concurrency=4)
		status_code, body = web.request("/api/method/frappe_pgpool.api.status", SITE, token)
	assert status_code == 200, body
	codes = [c for c, _ in results]
	(pool,) = body["message"]["pools"]
	print(
		f"\n{fault}: 200 requests after the fault -> {codes.count(200)} ok; this worker's pool closed {pool['closed']}"
	)
	assert codes.count(200) == len(codes)
	assert pool["in_use"] == 1 and pool["size"] <= pool["max_size"]  # the status request's own


def test_a_stalled_link_fails_the_request_within_connect_timeout_then_heals(env):
	"""Plain Frappe sets no connect_timeout: a pgBouncer that accepts but never answers hangs the
	request. Pooled connections carry db_pool_connect_timeout into libpq."""
	from frappe_pgpool.testing.proxy import StallingProxy

	bouncer, token = env["bouncer"], env["token"]
	config = read_site_config(SITE)
	with StallingProxy(bouncer.host, bouncer.port) as proxy:
		write_site_config(SITE, {**config, "db_port": proxy.port, "db_pool_connect_timeout": 2})
		try:
			with Gunicorn(workers=1) as web:
				proxy.stall()
				started = time.monotonic()
				code, _ = web.request("/api/resource/ToDo", SITE, token)
				failed_after = time.monotonic() - started
				proxy.resume()
				healed = [web.request("/api/resource/ToDo", SITE, token)[0] for _ in range(20)]
		finally:
			write_site_config(SITE, config)
	print(
		f"\nstalled link: request failed with {code} after {failed_after:.1f}s; then {healed.count(200)}/20 ok"
	)
	# each connection attempt is bounded; a request may make more than one (observed: 4.1 s for 2 s)
	assert code >= 500 and failed_after < 2 * 2 + 3
	assert healed == [200] * 20
