"""frappe_pgpool inside real Frappe: gunicorn over HTTP and RQ workers, behind a real pgBouncer.

Needs FRAPPE_BENCH_PATH and FRAPPE_SITE; FRAPPE_SITE2 (a second site with its own DB user)
for the two-site test. See tests/frappe/e2e.py for what the fixtures change during the run.
"""

from __future__ import annotations

import collections
import os
import time
import uuid

import pytest

from .bench import SITE, requires_bench, run_in_bench
from .e2e import (
	Gunicorn,
	failed_write_rolls_back_and_commits_are_seen,
	read_site_config,
	sites_behind_pgbouncer,
	status,
	wait_for,
	write_site_config,
)

pytestmark = [pytest.mark.frappe, requires_bench]
SITE2 = os.environ.get("FRAPPE_SITE2", "")

TOKEN_SCRIPT = """
import frappe
from frappe.core.doctype.user.user import generate_keys
frappe.init(site=SITE); frappe.connect(); frappe.set_user("Administrator")
secret = generate_keys("Administrator")["api_secret"]
key = frappe.db.get_value("User", "Administrator", "api_key")
frappe.db.commit(); frappe.destroy()
out(f"{key}:{secret}")
"""


@pytest.fixture(scope="module")
def env():
	sites = [SITE, *([SITE2] if SITE2 else [])]
	tokens = {site: run_in_bench(TOKEN_SCRIPT, site=site)[0] for site in sites}
	with sites_behind_pgbouncer(sites) as (bouncer, upstream):
		yield {"bouncer": bouncer, "upstream": upstream, "tokens": tokens, "sites": sites}


def db_name(site: str) -> str:
	return read_site_config(site)["db_name"]


def backends(upstream, site: str) -> list[tuple]:
	return upstream.query(
		"SELECT pid, backend_start FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
		(db_name(site),),
	)


def test_sync_workers_log_in_once_per_worker_and_reuse_backends(env):
	bouncer, upstream, token = env["bouncer"], env["upstream"], env["tokens"][SITE]
	db = db_name(SITE)
	logins_before = bouncer.logins(db)
	with Gunicorn(workers=2) as web:
		first = status(web, SITE, token)  # the very first request of a fresh worker
		assert first["patch_installed"] and first["pools"][0]["created"] == 1
		warm = list(web.each_worker(SITE, token).values())  # the other worker too, before the run
		warm += [status(web, SITE, token) for _ in range(10)]
		run_started = upstream.query("SELECT now()")[0][0]
		time.sleep(0.05)
		pings = web.hammer([("/api/method/ping", SITE, None)] * 1000, concurrency=4)
		todos = web.hammer([("/api/resource/ToDo", SITE, token)] * 1000, concurrency=4)
		assert {code for code, _ in pings} == {200} and {code for code, _ in todos} == {200}
		seen = [status(web, SITE, token) for _ in range(40)]
		workers = web.worker_pids()
		logins = bouncer.logins(db) - logins_before
		long_lived = [pid for pid, started in backends(upstream, SITE) if started < run_started]
	by_worker = collections.defaultdict(set)
	for s in [first, *warm, *seen]:
		by_worker[s["process_id"]].add(s["backend_pid"])
	print(
		f"\nsync: 2000 requests + {1 + len(warm) + len(seen)} status calls, workers={sorted(workers)}, pgBouncer logins={logins}"
	)
	print(f"sync: backend pid per worker: {dict(by_worker)}; backends older than the run: {long_lived}")
	assert logins <= len(workers) * 1  # workers x sites (today: one per request)
	assert all(len(pids) == 1 for pids in by_worker.values())  # consecutive requests: same backend
	assert set().union(*by_worker.values()) <= set(long_lived)
	# pg_stat_activity / SHOW CLIENTS tell which site and process holds each connection
	assert all(s["application_name"] == f"frappe:{SITE}:{s['process_id']}" for s in [first, *warm, *seen])
	# a kept connection carries the keepalives too (one opened for a single request carries only
	# connect_timeout: test_many_sites.py)
	assert {"keepalives": "1", "tcp_user_timeout": "60000"}.items() <= first["connection_options"].items()


def test_gthread_workers_keep_no_more_than_the_pool_size_and_never_wait_for_it(env):
	"""db_pool_size 2 under 4 threads per worker: the requests beyond 2 at once are served as plain Frappe
	serves them (a connection opened for the request, closed at its end), never made to wait (issue 23)."""
	bouncer, token = env["bouncer"], env["tokens"][SITE]
	db = db_name(SITE)
	config = read_site_config(SITE)
	write_site_config(SITE, {**config, "db_pool_size": 2})
	try:
		logins_before = bouncer.logins(db)
		with Gunicorn(workers=2, threads=4) as web:
			results = web.hammer([("/api/resource/ToDo", SITE, token)] * 600, concurrency=8)
			seen = [status(web, SITE, token) for _ in range(20)]
		logins = bouncer.logins(db) - logins_before
	finally:
		write_site_config(SITE, config)
	assert {code for code, _ in results} == {200}
	print(f"\ngthread: 600 requests at c=8 on 2x4 threads with db_pool_size=2: logins={logins}")
	assert logins <= 600 + 20  # never more than plain Frappe's one per request
	for s in seen:
		(pool,) = s["pools"]
		assert pool["created"] - sum(pool["closed"].values()) <= 2 and pool["max_size"] == 2
		assert pool["timeouts"] == 0 and pool["closed"].get("over_size", 0) <= pool["over_size"]


def test_failed_request_is_rolled_back_and_commits_are_seen_by_the_next_request(env):
	token = env["tokens"][SITE]
	marker = f"pgpool-{uuid.uuid4().hex[:10]}"
	with Gunicorn(workers=1) as web:
		failed_write_rolls_back_and_commits_are_seen(web, SITE, token, marker)
		isolation = run_in_bench(
			"""
			import frappe
			frappe.init(site=SITE); frappe.connect()
			out(frappe.db.sql("show transaction_isolation")[0][0]); frappe.destroy()
			"""
		)
	assert isolation == ["repeatable read"]


@pytest.mark.skipif(not SITE2, reason="FRAPPE_SITE2 not set: a second site with its own DB user")
def test_two_sites_alternating_never_cross(env):
	tokens = env["tokens"]
	calls = [
		("/api/method/frappe_pgpool.api.status", site, tokens[site])
		for _ in range(150)
		for site in (SITE, SITE2)
	]
	with Gunicorn(workers=2, threads=4) as web:
		results = web.hammer(calls, concurrency=8)
	for (_, site, _), (code, body) in zip(calls, results, strict=True):
		assert code == 200
		message = body["message"]
		assert message["site"] == site
		assert message["current_database"] == db_name(site) == message["current_user"]
	backend_sites = collections.defaultdict(set)
	for (_, site, _), (_, body) in zip(calls, results, strict=True):
		backend_sites[body["message"]["backend_pid"]].add(site)
	assert all(len(sites) == 1 for sites in backend_sites.values())  # zero cross-site reuse


def test_switching_the_pool_off_is_plain_frappe_without_a_restart(env):
	bouncer = env["bouncer"]
	db = db_name(SITE)
	config = read_site_config(SITE)
	with Gunicorn(workers=1) as web:
		web.hammer([("/api/method/ping", SITE, None)] * 20, concurrency=1)
		write_site_config(SITE, {**config, "db_pool_enabled": 0})
		try:
			before = bouncer.logins(db)
			web.hammer([("/api/method/ping", SITE, None)] * 50, concurrency=1)
			plain = bouncer.logins(db) - before
		finally:
			write_site_config(SITE, config)
		before = bouncer.logins(db)
		web.hammer([("/api/method/ping", SITE, None)] * 50, concurrency=1)
		pooled = bouncer.logins(db) - before
	print(f"\ntoggle: 50 pings with db_pool_enabled=0 -> {plain} logins; back on -> {pooled}")
	assert plain == 50 and pooled <= 1


JOBS_SCRIPT = """
import frappe
frappe.init(site=SITE); frappe.connect()
for _ in range({n}):
    frappe.enqueue("frappe.client.get_count", doctype="ToDo", queue="{queue}")
frappe.db.commit(); frappe.destroy()
out({n})
"""

SIMPLE_WORKER = """
import frappe
from rq import SimpleWorker
from frappe.utils.background_jobs import get_redis_conn, get_queue_list
with frappe.init_site():
    conn = get_redis_conn()
    queues = get_queue_list(["{queue}"], build_queue_name=True)
SimpleWorker(queues, connection=conn).work(burst=True)
out("done")
"""


# Frappe v16's FRAPPE_BACKGROUND_WORKERS_NOFORK shape on v15: an RQ WorkerPool (as
# start_worker_pool builds) whose worker processes run every job in-process (FrappeWorkerNoFork).
NOFORK_POOL = """
import frappe
from rq import SimpleWorker
from rq.worker_pool import WorkerPool
from frappe.utils.background_jobs import get_redis_conn, get_queue_list
with frappe.init_site():
    conn = get_redis_conn()
    queues = get_queue_list(["{queue}"], build_queue_name=True)
WorkerPool(queues, connection=conn, num_workers=2, worker_class=SimpleWorker).start(logging_level="WARNING", burst=True)
out("done")
"""


@pytest.mark.parametrize(
	"shape", ["fork-per-job", "simple-worker", "no-fork-worker-pool"], ids=lambda shape: shape
)
def test_background_jobs(env, shape):
	bouncer, upstream = env["bouncer"], env["upstream"]
	db = db_name(SITE)
	queue = "long"
	run_in_bench(JOBS_SCRIPT.format(n=500, queue=queue))
	before = bouncer.logins(db)
	if shape == "fork-per-job":
		run_in_bench(
			f"""
			from frappe.utils.background_jobs import start_worker
			start_worker(queue="{queue}", quiet=True, burst=True)
			out("done")
			"""
		)
	elif shape == "simple-worker":
		run_in_bench(SIMPLE_WORKER.format(queue=queue))
	else:
		run_in_bench(NOFORK_POOL.format(queue=queue))
	logins = bouncer.logins(db) - before
	# nothing leaks: at most the idle one, once the backends pgBouncer dropped at the worker's exit ended
	# (the wait fails the test if they never do)
	wait_for(lambda: len(backends(upstream, SITE)) <= 1 + 2, "the site's backends down to 3")
	print(f"\njobs ({shape}): 500 jobs -> {logins} pgBouncer logins")
	if shape == "fork-per-job":
		assert logins == 500  # a work-horse is a new process: its own connection, never its parent's
	elif shape == "simple-worker":
		assert logins == 1  # one process runs all jobs: one connection reused
	else:
		assert 1 <= logins <= 2  # one per pool worker that took jobs, for all 500 jobs


KEEPALIVE_SCRIPT = """
import socket
import frappe
from frappe_pgpool.pool import registry

frappe.init(site=SITE, sites_path=".")
frappe.connect()
frappe.db.sql("SELECT 1")
conn = frappe.db._conn
sock = socket.socket(fileno=os.dup(conn.fileno()))
options = {
    "pooled": registry.owns(conn),
    "family": sock.family.name,
    "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
}
sock.close()
frappe.destroy()
out(options)
"""


def test_pooled_connections_get_tcp_keepalives(env):
	"""A pooled connection of the real bench, through pgBouncer over TCP, carries the keepalive options
	(libpq's, passed by the psycopg2.connect wrapper): a silent network loss is noticed in about a minute."""
	(options,) = run_in_bench(KEEPALIVE_SCRIPT)
	assert options == {
		"pooled": True,
		"family": "AF_INET",
		"keepalive": 1,
		"idle": 30,
		"interval": 10,
		"count": 3,
		"user_timeout_ms": 60000,
	}
