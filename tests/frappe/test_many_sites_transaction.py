"""Many sites behind pgBouncer in transaction mode, on real Frappe, pgBouncer and PostgreSQL (issue 24).

A kept connection there is a pgBouncer client, not a server: with db_pool_process_clients set (opt-in; 100
here) the transaction-mode pools of a process share that client budget, so a sync worker going round 10
sites keeps a client for each and logs in no more after its first round, where under the peak rule (the
default) it would log in per request. The
servers are pgBouncer's: each pool keeps those its clients gave back until server_idle_timeout, and
`bench pgpool doctor` predicts the most of them from pgBouncer's real settings.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from frappe_pgpool.testing.sites import make_quick_sites, remove_quick_sites

from .bench import BENCH, SITE, bench_cli, requires_bench
from .e2e import Gunicorn
from .sites import (
	Sampler,
	common_config_path,
	configs_restored,
	connection_timeline,
	logins,
	point_at,
	set_common_config,
	set_site_config,
	start_bouncer,
	timeline_peaks,
)

pytestmark = [pytest.mark.frappe, requires_bench]

SITES = [f"mtx{i:02d}.pgpool.test" for i in range(1, 11)]  # own database and user each
WORKERS = 2
KEY = "db_pool_process_clients"


@pytest.fixture(scope="module")
def fleet():
	remove_quick_sites(BENCH, SITES)
	quick = make_quick_sites(BENCH, SITE, SITES)
	try:
		with configs_restored(SITES):
			set_common_config(db_pool_pgbouncer_mode="transaction", db_pool_process_clients=100)
			# max_db_connections 2: at most 2 servers per site's pool, so 10 x 2 fit any PostgreSQL here
			bouncer = start_bouncer(
				quick, "transaction", default_pool_size=20, max_db_connections=2, max_client_conn=200
			)
			try:
				point_at(SITES, bouncer.host, bouncer.port)
				yield {"bouncer": bouncer, "quick": quick, "dbs": {q.db_name for q in quick}}
			finally:
				bouncer.__exit__(None, None, None)
				set_common_config(db_pool_pgbouncer_mode=None, db_pool_process_clients=None)
	finally:
		remove_quick_sites(BENCH, SITES)


def test_sync_workers_keep_a_client_per_site_and_stay_within_doctors_servers(fleet, monkeypatch):
	bouncer, dbs = fleet["bouncer"], fleet["dbs"]
	with Gunicorn(workers=WORKERS) as web:
		# warm-up: every site, in turn, several times per worker (requests land where they land)
		warm = web.hammer([("/api/method/ping", SITES[i % len(SITES)]) for i in range(8 * WORKERS * 10)], 2)
		pids = web.worker_pids()
		# the (worker, site) pairs that kept a client: the kernel picks the worker, so a pair the warm-up
		# never reached may still log in once below, and only such a pair
		clients_kept = [c["database"] for c in bouncer.admin("SHOW CLIENTS") if c["database"] in dbs]
		kept = len(clients_kept)
		sampler = Sampler(dbs, bouncer, interval=0.1, sockets=(lambda: pids, bouncer.port))
		before = logins(bouncer, dbs)
		sampler.start()
		started = time.time()
		results = web.hammer([("/api/method/ping", SITES[i % len(SITES)]) for i in range(300)], 2)
		ended = time.time()
		sampler.stop()
		after = logins(bouncer, dbs)
	assert {code for code, _ in warm + results} == {200}
	clients, servers = timeline_peaks(connection_timeline(bouncer, dbs), started, ended)
	backends = sampler.peak("backends")  # fails on a lost sample: a silent zero would pass the bound
	print(
		f"\nsync x{WORKERS}, transaction mode, 300 pings round robin over {len(SITES)} sites: "
		f"{after - before} logins, clients {clients}, servers {servers}, backends {backends} (sampled), "
		f"{kept} clients kept after the warm-up"
	)
	# a client per site and worker, kept: no login after the warm-up (the peak rule logs in per request)
	assert set(clients_kept) == dbs  # the warm-up reached every site, which kept a client
	assert after - before <= WORKERS * len(SITES) - kept
	assert clients <= WORKERS * len(SITES)
	# what doctor predicts from pgBouncer's settings for this bench, and the real peak within it
	monkeypatch.setenv(
		"PGPOOL_ADMIN_DSN", bouncer.dsn(bouncer.admin_user, bouncer.admin_password, "pgbouncer")
	)
	result = bench_cli(
		"pgpool", "doctor", "--web-workers", str(WORKERS), "--threads", "1", site=SITES[0], timeout=300
	)
	print(result.stdout)
	(line,) = [x for x in result.stdout.splitlines() if x.startswith("ok    server_idle_timeout")]
	predicted = int(re.search(r"up to (\d+) servers in all", line)[1])
	assert predicted == 2 * len(SITES)  # max_db_connections 2 per site's database
	assert servers <= predicted and backends <= predicted
	(clients_line,) = [x for x in result.stdout.splitlines() if "max_client_conn" in x and "clients" in x]
	assert f"x {len(SITES)}" in clients_line  # every process may keep a client per site


def test_doctor_apply_sets_the_client_budget_that_fits_and_removes_one_that_does_not(fleet, monkeypatch):
	"""`bench pgpool doctor --apply`: db_pool_process_clients in common_site_config.json at the largest value
	every check accepts (a client of each of the 10 sites; the most max_client_conn=200 accepts where it
	refuses that),
	removed where the servers cannot be counted (a site in transaction mode with no pgBouncer examined)."""
	bouncer = fleet["bouncer"]
	monkeypatch.setenv(
		"PGPOOL_ADMIN_DSN", bouncer.dsn(bouncer.admin_user, bouncer.admin_password, "pgbouncer")
	)

	def apply(*workers: str) -> tuple[str, object, int]:
		result = bench_cli("pgpool", "doctor", "--apply", *workers, site=SITES[0], timeout=300)
		print(result.stdout, result.stderr)
		assert "Traceback" not in result.stderr
		lines = result.stdout.splitlines()
		applied = lines[next(i for i, x in enumerate(lines) if x.startswith("apply:")) :]
		for secret in (bouncer.admin_password, *(q.db_password for q in fleet["quick"])):
			assert secret not in result.stdout + result.stderr
		return "\n".join(applied), json.loads(common_config_path().read_text()).get(KEY), result.returncode

	with configs_restored([SITE]):
		try:
			# only the fleet in transaction mode (its own site_config), the rest of the bench as it was
			set_common_config(db_pool_pgbouncer_mode=None, db_pool_process_clients=None)
			set_site_config(SITES, db_pool_pgbouncer_mode="transaction")
			common_config_path().chmod(0o640)  # it may hold passwords: the rewrite keeps its mode
			text, value, code = apply("--web-workers", "2", "--threads", "1", "--job-processes", "1")
			assert value == len(SITES) and code == 0, text
			assert common_config_path().stat().st_mode & 0o777 == 0o640
			assert f"{KEY} set to {len(SITES)}" in text and "(was unset)" in text
			# the clients it counted: --job-processes 1 asks about fewer job processes than the bench's
			# background_workers 1 runs (2 x 1 + 1), and a value written must fit the real bench too
			assert "2 web x 10 + 3 job x 10 = 50" in text
			# 30 web workers + 3: 33 x 10 clients > max_client_conn=200; 33 x 6 = 198 fit, 33 x 7 do not
			text, value, code = apply("--web-workers", "30", "--threads", "1", "--job-processes", "1")
			assert value == 6 and f"{KEY} set to 6" in text and "(was 10)" in text, text
			# a site in transaction mode whose pgBouncer doctor cannot see: its servers cannot be counted
			set_site_config([SITE], db_pool_pgbouncer_mode="transaction")
			text, value, code = apply("--web-workers", "2", "--threads", "1", "--job-processes", "1")
			# cannot tell: the key is left as it is, and the command fails
			assert value == 6 and "apply: cannot tell" in text and code == 1, text
			assert f"{SITE}" in text and "no pgBouncer admin console examined" in text
		finally:
			common_config_path().chmod(0o644)
			set_site_config(SITES, db_pool_pgbouncer_mode=None)
			set_common_config(db_pool_pgbouncer_mode="transaction", db_pool_process_clients=100)
