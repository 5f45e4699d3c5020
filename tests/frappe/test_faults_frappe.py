"""Faults under real Frappe: after pgBouncer restarts, backends are terminated or pgBouncer KILLs
its clients, the next requests of workers holding pooled (now dead) connections all succeed."""

from __future__ import annotations

import os
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


# PGPOOL_FAULTS_NO_FAULT=1 removes the fault (nothing is done where it would be): each test must then fail
NO_FAULT = os.environ.get("PGPOOL_FAULTS_NO_FAULT") == "1"
# why a pool closes a connection a fault broke: found dead at checkout, or broken under a statement
FAULT_REASONS = ("dead", "broken")


def closed_by_faults(status: dict) -> int:
	return sum(pool["closed"].get(r, 0) for pool in status["pools"] for r in FAULT_REASONS)


def wait_until(predicate, what: str, within: float = 60) -> None:
	"""Poll a state until it holds: a hang detector at `within` seconds, never a speed bound."""
	deadline = time.monotonic() + within
	while not predicate():
		assert time.monotonic() < deadline, f"never reached: {what}"
		time.sleep(0.05)


@pytest.mark.parametrize("fault", ["pgbouncer SIGTERM restart", "pg_terminate_backend", "pgbouncer KILL"])
def test_no_request_fails_after_the_fault(env, fault):
	bouncer, upstream, token = env["bouncer"], env["upstream"], env["token"]
	db = read_site_config(SITE)["db_name"]
	with Gunicorn(workers=2) as web:
		warm = web.hammer([("/api/method/ping", SITE, None)] * 50, concurrency=4)
		assert {code for code, _ in warm} == {200}
		before = web.each_worker(SITE, token)
		# each worker holds a pooled connection: pgBouncer lists it as a client of the site's database
		pooled = {(c["addr"], c["port"]) for c in bouncer.clients() if c["database"] == db}
		assert len(pooled) >= len(before), pooled
		old_bouncer_pid = bouncer.proc.pid
		if NO_FAULT:
			terminated = 0
		elif fault == "pgbouncer SIGTERM restart":
			bouncer.restart(signal.SIGTERM)
		elif fault == "pg_terminate_backend":
			rows = upstream.query(
				"SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
				"WHERE datname = %s AND backend_type = 'client backend'",
				(db,),
			)
			terminated = {pid for pid, done in rows if done}
		else:
			bouncer.admin(f"KILL {db}")
			bouncer.admin(f"RESUME {db}")
		# the fault happened: what it does is seen done (a state polled, not a guessed sleep)
		if fault == "pgbouncer SIGTERM restart":
			assert bouncer.proc.pid != old_bouncer_pid, "pgBouncer was not restarted"
		elif fault == "pg_terminate_backend":
			assert terminated, "no backend of the site was terminated"

			def gone() -> bool:
				rows = upstream.query(
					"SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (sorted(terminated),)
				)
				return not rows

			wait_until(gone, "the terminated backends' exit")
		# every pooled client pgBouncer had is gone (in session mode it closes a client with its server)
		wait_until(
			lambda: not pooled & {(c["addr"], c["port"]) for c in bouncer.clients() if c["database"] == db},
			"pgBouncer dropping the pooled clients",
		)
		results = web.hammer([("/api/resource/ToDo", SITE, token)] * 200, concurrency=4)
		after = web.each_worker(SITE, token)
	codes = [c for c, _ in results]
	print(
		f"\n{fault}: 200 requests after the fault -> {codes.count(200)} ok; closed by the workers' pools "
		f"{[p['closed'] for s in after.values() for p in s['pools']]}"
	)
	# the fault reached the pooled connections: each worker that held one closed it as dead or broken
	holding = [pid for pid, s in before.items() if s["pools"] and s["pools"][0]["size"] >= 1]
	assert holding, before
	for pid in holding:
		assert closed_by_faults(after[pid]) > closed_by_faults(before[pid]), (pid, before[pid], after[pid])
	assert codes.count(200) == len(codes)
	for s in after.values():
		(pool,) = s["pools"]
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
				# answered while the link is still stalled: connect_timeout ended the connection attempt
				# (the client's own 60 s timeout is the hang detector; an answer it never got raises)
				code, body = web.request("/api/resource/ToDo", SITE, token)
				proxy.resume()
				healed = [web.request("/api/resource/ToDo", SITE, token)[0] for _ in range(20)]
		finally:
			write_site_config(SITE, config)
	print(f"\nstalled link: request failed with {code} ({str(body)[:300]}); then {healed.count(200)}/20 ok")
	# the error is libpq's connect_timeout, not a hang cut short by something else
	assert code >= 500 and body.get("exc_type") == "OperationalError", body
	assert "timeout expired" in body.get("exc", ""), body
	assert healed == [200] * 20
