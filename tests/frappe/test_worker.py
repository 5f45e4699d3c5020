"""`bench pgpool worker`, the no-fork job worker (frappe_pgpool/worker.py), on the real bench.

Jobs are enqueued with Frappe's own frappe.enqueue on real sites behind a real pgBouncer (session
mode); the worker is started with the bench CLI (`bench pgpool worker`) as an operator starts it, and
what happened is read back from rq (job status, results, exceptions), pgBouncer (logins), PostgreSQL
(pg_stat_activity, rows) and the worker's exit status. Needs FRAPPE_SITE2 for the two-site tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import pytest

from .bench import BENCH, SITE, bench_cli, requires_bench, run_in_bench
from .e2e import read_site_config, sites_behind_pgbouncer, wait_for

pytestmark = [pytest.mark.frappe, requires_bench]
SITE2 = os.environ.get("FRAPPE_SITE2", "")
needs_two_sites = pytest.mark.skipif(
	not SITE2, reason="FRAPPE_SITE2 not set: a second site with its own DB user"
)
QUEUE = "short"
JOBS = "frappe_pgpool.testing.jobs"

ENQUEUE = """
import frappe
calls = {calls!r}
ids = []
for site, user, method, kwargs, timeout in calls:
    frappe.init(site=site); frappe.connect()
    frappe.set_user(user)
    job = frappe.enqueue("{jobs}." + method, queue="{queue}", timeout=timeout, **kwargs)
    ids.append(job.id)
    frappe.db.commit(); frappe.destroy()
out(ids)
"""

FETCH = """
from rq.job import Job
from frappe.utils.background_jobs import get_redis_conn, get_queue
import frappe
with frappe.init_site():
    conn = get_redis_conn()
    queued = get_queue("{queue}").count
result = []
for job_id in {ids!r}:
    job = Job.fetch(job_id, connection=conn)
    result.append({{"status": job.get_status(), "value": job.return_value(), "exc": job.exc_info or ""}})
out(result)
out(queued)
"""

EMPTY = """
import frappe
from frappe.utils.background_jobs import get_queue
with frappe.init_site():
    get_queue("{queue}").empty()
out(0)
"""


@pytest.fixture(scope="module")
def env():
	sites = [SITE, *([SITE2] if SITE2 else [])]
	with sites_behind_pgbouncer(sites) as (bouncer, upstream):
		yield {"bouncer": bouncer, "upstream": upstream}


@pytest.fixture(autouse=True)
def empty_queue():
	run_in_bench(EMPTY.format(queue=QUEUE))
	yield
	run_in_bench(EMPTY.format(queue=QUEUE))


def db_name(site: str) -> str:
	return read_site_config(site)["db_name"]


def enqueue(calls: list[tuple]) -> list[str]:
	"""calls: (site, user, method of testing/jobs.py, kwargs, timeout); returns the job ids, in order."""
	full = [(c[0], c[1], c[2], c[3] if len(c) > 3 else {}, c[4] if len(c) > 4 else None) for c in calls]
	(ids,) = run_in_bench(ENQUEUE.format(calls=full, jobs=JOBS, queue=QUEUE))
	return ids


def fetch(ids: list[str]) -> tuple[list[dict], int]:
	"""Each job's status, result and exception text; and how many jobs are still queued."""
	results, queued = run_in_bench(FETCH.format(ids=ids, queue=QUEUE))
	return results, queued


def worker(*args: str) -> subprocess.CompletedProcess:
	"""`bench pgpool worker --queue short --burst ARGS`, run to its end."""
	return bench_cli("pgpool", "worker", "--queue", QUEUE, "--burst", *args, site=None)


@contextlib.contextmanager
def running_worker(*args: str, command: tuple[str, ...] = ("pgpool", "worker")):
	"""`bench pgpool worker --queue short ARGS` (or `bench worker` with command=("worker",)) as a
	long-running process (as a supervisor runs it), in a process group of its own (a forking worker's
	work-horse is in it too)."""
	proc = subprocess.Popen(
		[
			str(Path(BENCH, "env", "bin", "python")),
			"-m",
			"frappe.utils.bench_helper",
			"frappe",
			*command,
			"--queue",
			QUEUE,
			*args,
		],
		cwd=Path(BENCH, "sites"),
		stdout=subprocess.PIPE,
		stderr=subprocess.STDOUT,
		text=True,
		start_new_session=True,
	)
	try:
		yield proc
	finally:
		with contextlib.suppress(ProcessLookupError):
			os.killpg(proc.pid, signal.SIGKILL)  # the worker and any work-horse it left
		proc.wait()


def sessions(upstream, site: str) -> list[tuple]:
	"""(pid, state, query) of the site's database sessions on PostgreSQL."""
	return upstream.query(
		"SELECT pid, state, query FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
		(db_name(site),),
	)


def count_todos(upstream, site: str, prefix: str) -> int:
	with contextlib.closing(upstream.connect(db_name(site))) as conn, conn.cursor() as cur:
		cur.execute('SELECT count(*) FROM "tabToDo" WHERE description LIKE %s', (prefix + "%",))
		return cur.fetchone()[0]


def marker_file() -> str:
	return os.path.join(tempfile.gettempdir(), f"pgpool-job-{uuid.uuid4().hex[:10]}")


# -- connections kept across jobs ---------------------------------------------------------------------


@needs_two_sites
def test_jobs_of_two_sites_log_in_once_per_site(env):
	"""200 jobs alternating between two sites, one worker with --process-budget 2: one login per site (the
	forking worker: one per job), every job done once (its row counted), one worker process."""
	bouncer, upstream = env["bouncer"], env["upstream"]
	tag = f"w-{uuid.uuid4().hex[:8]}"
	calls = [
		(site, "Administrator", "insert_and_read", {"tag": tag, "n": i})
		for i in range(100)
		for site in (SITE, SITE2)
	]
	calls += [(site, "Administrator", "backend") for site in (SITE, SITE2)]
	ids = enqueue(calls)
	before = {site: bouncer.logins(db_name(site)) for site in (SITE, SITE2)}
	done = worker("--no-scheduler", "--process-budget", "2")
	assert done.returncode == 0, done.stderr[-3000:]
	logins = {site: bouncer.logins(db_name(site)) - before[site] for site in (SITE, SITE2)}
	results, queued = fetch(ids)
	print(f"\nno-fork worker: 202 jobs over 2 sites -> logins {logins}")
	assert [r["status"] for r in results] == ["finished"] * len(ids) and queued == 0
	# one login per site: under a numeric budget a site's first checkout, which could not hit, does not
	# shut the reuse gate (pool/budget.py; it did, and the second site logged in twice)
	assert logins == {SITE: 1, SITE2: 1}
	assert {site: count_todos(upstream, site, tag + ":") for site in (SITE, SITE2)} == {SITE: 100, SITE2: 100}
	pids = {r["value"]["pid"] for r in results[-2:]}
	assert len(pids) == 1  # all in the worker process itself
	assert [r["value"]["database"] for r in results[-2:]] == [db_name(SITE), db_name(SITE2)]


# -- state between jobs ----------------------------------------------------------------------------------


CLEAR_TAG = """
import frappe
frappe.init(site=SITE); frappe.connect()
frappe.cache.delete_value("pgpool_tag")
frappe.destroy()
out(0)
"""


@needs_two_sites
def test_a_job_sees_nothing_the_previous_job_left(env):
	"""Jobs of two sites and two users interleaved, each leaving flags, frappe.local attributes, the request
	cache, a language, another user and session settings behind: each next job sees only its own site,
	its own user and fresh state, exactly what the same jobs see under the forking `bench worker`."""
	order = [(SITE, "Administrator"), (SITE2, "Guest"), (SITE, "Guest"), (SITE2, "Administrator")] * 5
	seen = {}
	for shape in ("fork", "no-fork"):
		for site in (SITE, SITE2):
			run_in_bench(CLEAR_TAG, site=site)
		tags = [f"{shape}-{i}" for i in range(len(order))]
		ids = enqueue(
			[
				(site, user, "observe_then_dirty", {"tag": tag})
				for (site, user), tag in zip(order, tags, strict=True)
			]
		)
		if shape == "fork":
			done = bench_cli("worker", "--queue", QUEUE, "--burst", site=None)
		else:
			done = worker("--no-scheduler")
		assert done.returncode == 0, done.stderr[-3000:]
		results, _ = fetch(ids)
		assert [r["status"] for r in results] == ["finished"] * len(ids), [r["exc"][-500:] for r in results]
		seen[shape] = [r["value"] for r in results]
	for (site, user), job in zip(order, seen["no-fork"], strict=True):
		assert job["site"] == job["site_cache"] == site
		assert job["user"] == user
		assert job["database"] == job["db_user"] == db_name(site)
		assert job["flag"] is job["local"] is job["local_cache"] is None
		assert job["work_mem"] == "4MB" and job["pending"] == 0
	for shape, jobs in seen.items():
		previous = {}  # the site's own shared Redis cache: the previous job of the same site, never the other's
		for i, ((site, _), job) in enumerate(zip(order, jobs, strict=True)):
			assert job["redis"] == previous.get(site)
			previous[site] = f"{shape}-{i}"

	def comparable(job):
		return {k: v for k, v in job.items() if k != "redis"}

	assert [comparable(j) for j in seen["no-fork"]] == [comparable(j) for j in seen["fork"]]


# -- timeouts, crashes, failures ------------------------------------------------------------------------


def _job_after_an_interruption(env, method: str, kwargs: dict, timeout: int | None):
	upstream = env["upstream"]
	marker = marker_file()
	ids = enqueue(
		[
			(SITE, "Administrator", "backend"),
			(SITE, "Administrator", method, {**kwargs, "marker": marker}, timeout),
			(SITE, "Administrator", "backend"),
		]
	)
	done = worker("--no-scheduler")
	assert done.returncode == 0, done.stderr[-3000:]
	results, queued = fetch(ids)
	interrupted_backend = int(Path(marker).read_text())
	os.unlink(marker)
	return results, queued, interrupted_backend, sessions(upstream, SITE)


def test_a_job_timed_out_in_a_query_is_stopped_and_its_connection_is_not_reused(env):
	"""A job waiting in `SELECT pg_sleep(600)` past its 3 s timeout: the query is cancelled, the job fails
	with the timeout, the worker goes on to the next job on a new connection, and PostgreSQL has no open
	transaction or running sleep left for the site."""
	results, queued, stuck, left = _job_after_an_interruption(env, "sleep_in_query", {"seconds": 600}, 3)
	first, timed_out, after = results
	assert [first["status"], timed_out["status"], after["status"]] == ["finished", "failed", "finished"]
	assert "JobTimeoutException" in timed_out["exc"] or "QueryCanceled" in timed_out["exc"]
	assert first["value"]["pid"] == after["value"]["pid"]  # the same worker process ran on
	assert first["value"]["backend"] == stuck  # the kept connection was the one the job used ...
	assert after["value"]["backend"] != stuck  # ... and is not reused after the timeout
	assert stuck not in {pid for pid, _, _ in left}
	assert not [s for s in left if s[1] in ("active", "idle in transaction") and "pg_sleep" in (s[2] or "")]
	assert not [s for s in left if s[1] == "idle in transaction"]
	assert queued == 0


def test_a_job_timed_out_in_python_is_stopped_and_its_transaction_rolled_back(env):
	"""A job holding an uncommitted insert, still in Python at its 10 s timeout: it fails with the timeout,
	its row is not committed, the next job runs on a new connection. (10 s, not less: the job's insert,
	the first in this process, must be done before the timeout for the job to reach its marker.)"""
	tag = f"timeout-{uuid.uuid4().hex[:8]}"
	results, _, stuck, left = _job_after_an_interruption(
		env, "sleep_in_python", {"seconds": 600, "tag": tag}, 10
	)
	first, timed_out, after = results
	assert [first["status"], timed_out["status"], after["status"]] == ["finished", "failed", "finished"]
	assert "JobTimeoutException" in timed_out["exc"]
	assert after["value"]["backend"] != stuck and first["value"]["pid"] == after["value"]["pid"]
	assert count_todos(env["upstream"], SITE, tag) == 0
	assert not [s for s in left if s[1] == "idle in transaction"]


def test_a_job_whose_session_dies_mid_query_fails_and_the_next_job_runs(env):
	"""The job's backend is terminated under its statement: the job fails (OperationalError), the broken
	connection is not handed out again, the next job runs on a new one in the same worker."""
	results, _, dead, left = _job_after_an_interruption(env, "crash_mid_query", {}, None)
	first, crashed, after = results
	assert [first["status"], crashed["status"], after["status"]] == ["finished", "failed", "finished"]
	assert "OperationalError" in crashed["exc"] or "InterfaceError" in crashed["exc"]
	assert after["value"]["backend"] != dead and first["value"]["pid"] == after["value"]["pid"]
	assert dead not in {pid for pid, _, _ in left}


ERROR_LOGS = """
import frappe
frappe.init(site=SITE); frappe.connect()
out(frappe.db.count("Error Log", {{"method": "{method}"}}))
frappe.destroy()
"""


def test_a_failed_job_is_recorded_as_in_plain_frappe_and_keeps_its_sound_connection(env):
	"""A job raising in its own code: failed in rq with its exception, one Error Log row as Frappe's
	execute_job writes it, under both workers; the no-fork worker keeps the (sound) connection."""
	method = f"{JOBS}.fail"
	counts = []
	for shape in ("fork", "no-fork"):
		before = run_in_bench(ERROR_LOGS.format(method=method))[0]
		ids = enqueue(
			[
				(SITE, "Administrator", "backend"),
				(SITE, "Administrator", "fail", {"message": f"pgpool {shape} failure"}),
				(SITE, "Administrator", "backend"),
			]
		)
		if shape == "fork":
			done = bench_cli("worker", "--queue", QUEUE, "--burst", site=None)
		else:
			done = worker("--no-scheduler")
		assert done.returncode == 0, done.stderr[-3000:]
		results, _ = fetch(ids)
		assert [r["status"] for r in results] == ["finished", "failed", "finished"]
		assert f"ValueError: pgpool {shape} failure" in results[1]["exc"]
		counts.append(run_in_bench(ERROR_LOGS.format(method=method))[0] - before)
		if shape == "no-fork":
			assert results[0]["value"]["backend"] == results[2]["value"]["backend"]
	assert counts == [1, 1]


STARTED = """
from rq.job import Job
from rq.registry import StartedJobRegistry
from frappe.utils.background_jobs import get_redis_conn, get_queue
import frappe
with frappe.init_site():
    conn = get_redis_conn()
    registry = StartedJobRegistry(queue=get_queue("{queue}"))
job = Job.fetch("{job_id}", connection=conn)
out(job.get_status())
out(conn.zscore(registry.key, job.id))
"""

# What a worker's clean_registries does (rq's StartedJobRegistry.cleanup), at a time after the entry lapsed.
CLEAN_STARTED = """
from rq.job import Job
from rq.registry import StartedJobRegistry
from frappe.utils.background_jobs import get_redis_conn, get_queue
import frappe
with frappe.init_site():
    conn = get_redis_conn()
    registry = StartedJobRegistry(queue=get_queue("{queue}"))
registry.cleanup({timestamp!r})
job = Job.fetch("{job_id}", connection=conn)
out(job.get_status())
out(job.exc_info or "")
"""


def kill_worker(proc: subprocess.Popen) -> None:
	"""SIGKILL to the worker and to every process it forked: rq's work-horse runs in a session of its own
	(os.setsid), so a signal to the worker's process group does not reach it. The worker first: killed
	alone, the horse would be reported failed by its parent at once."""
	children = []
	for stat in Path("/proc").glob("[0-9]*/stat"):
		with contextlib.suppress(OSError, ValueError, IndexError):
			if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
				children.append(int(stat.parent.name))
	os.kill(proc.pid, signal.SIGKILL)
	for pid in children:
		with contextlib.suppress(ProcessLookupError):
			os.kill(pid, signal.SIGKILL)


def _sleeping(upstream, backend: int) -> bool:
	return any(
		pid == backend and state == "active" and "pg_sleep" in (q or "")
		for pid, state, q in sessions(upstream, SITE)
	)


def _gone(upstream, backend: int) -> bool:
	return backend not in {pid for pid, _, _ in sessions(upstream, SITE)}


def test_a_worker_killed_mid_job_loses_nothing_silently_as_the_forking_worker(env):
	"""SIGKILL while the job waits in `SELECT pg_sleep(20)` inside a transaction (an uncommitted ToDo),
	to the forking `bench worker` (the worker and its work-horse: a container's or a machine's end, or
	the OOM killer taking both) and to `bench pgpool worker` (one process): under both, PostgreSQL is left with no
	backend of the job (its transaction rolled back, nothing committed); the job stays visible as
	started, its entry in rq's started registry lapses within job_monitoring_interval + 60 s of the
	kill (the forking worker's parent heartbeats; the no-fork worker's watchdog does the same: before,
	the entry stood until the job's start + timeout + 60 s), and rq's registry cleanup then records it
	as failed (AbandonedJobError); a worker started afterwards runs the next job on a new backend."""
	upstream = env["upstream"]
	lapse = {}
	for shape in ("fork", "no-fork"):
		tag = f"killed-{shape}-{uuid.uuid4().hex[:8]}"
		marker = marker_file()
		(job_id,) = enqueue(
			[(SITE, "Administrator", "sleep_in_query", {"seconds": 20, "marker": marker, "tag": tag}, 300)]
		)
		command = ("worker",) if shape == "fork" else ("pgpool", "worker", "--no-scheduler")
		with running_worker(command=command) as proc:
			wait_for(partial(os.path.exists, marker), "the job started")
			backend = int(Path(marker).read_text())
			wait_for(partial(_sleeping, upstream, backend), "the job's query runs")
			kill_worker(proc)
			killed_at = time.time()
			proc.wait()
		os.unlink(marker)
		# the backend ends (at the latest when its pg_sleep returns to a closed socket) and rolls back
		wait_for(partial(_gone, upstream, backend), "the killed job's backend is gone", within=240)
		assert count_todos(upstream, SITE, tag) == 0
		assert not [s for s in sessions(upstream, SITE) if s[1] == "idle in transaction"]
		status, expiry = run_in_bench(STARTED.format(queue=QUEUE, job_id=job_id))
		assert status == "started" and expiry is not None  # visible, not lost
		lapse[shape] = expiry - killed_at
		status, exc = run_in_bench(CLEAN_STARTED.format(queue=QUEUE, job_id=job_id, timestamp=expiry + 1))
		assert status == "failed" and "AbandonedJobError" in exc, (shape, exc)
	print(f"\nstarted-registry entry lapses after the kill: {lapse}")
	interval = 30  # rq's DEFAULT_JOB_MONITORING_INTERVAL, the heartbeat period of both
	assert lapse["fork"] <= interval + 60 + 1 and lapse["no-fork"] <= interval + 60 + 1
	ids = enqueue([(SITE, "Administrator", "backend")])
	done = worker("--no-scheduler")
	assert done.returncode == 0, done.stderr[-3000:]
	(after,), queued = fetch(ids)
	assert after["status"] == "finished" and queued == 0
	assert after["value"]["backend"] != backend


STUBBORN_TIMEOUT = 5
HARD_STOP_AFTER = 5  # --hard-stop-after for these tests (default 60, the forking worker's bound)


def _stubborn_job(tag: str, marker: str) -> list[str]:
	"""A job that swallows its timeout's exception and loops on (600 s), after a quick job and an insert
	(which loads what an insert needs, so the stubborn job's own insert is done well within its timeout)
	and before a quick job. Returns the ids of the first, the stubborn and the last job."""
	ids = enqueue(
		[
			(SITE, "Administrator", "backend"),
			(SITE, "Administrator", "insert_and_read", {"tag": f"warm-{tag}"}),
			(
				SITE,
				"Administrator",
				"ignore_timeout",
				{"seconds": 600, "marker": marker, "tag": tag},
				STUBBORN_TIMEOUT,
			),
			(SITE, "Administrator", "backend"),
		]
	)
	return [ids[0], ids[2], ids[3]]


JOB_TIMES = """
from rq.job import Job
from frappe.utils.background_jobs import get_redis_conn
import frappe
with frappe.init_site():
    conn = get_redis_conn()
job = Job.fetch("{job_id}", connection=conn)
out((job.ended_at - job.started_at).total_seconds() if job.ended_at and job.started_at else None)
"""


def _assert_hard_stopped(env, job: dict, job_id: str, tag: str, stuck: int) -> None:
	assert job["status"] == "failed" and "not stopped" in job["exc"], job["exc"][-500:]
	(ran,) = run_in_bench(JOB_TIMES.format(job_id=job_id))
	print(f"\nhard-stopped job ran {ran}s (timeout {STUBBORN_TIMEOUT} s + {HARD_STOP_AFTER} s)")
	assert ran is not None and ran >= STUBBORN_TIMEOUT + HARD_STOP_AFTER  # the hard stop ended it
	wait_for(partial(_gone, env["upstream"], stuck), "the stuck job's backend is gone")
	assert count_todos(env["upstream"], SITE, tag) == 0  # its transaction rolled back
	assert not [s for s in sessions(env["upstream"], SITE) if s[1] == "idle in transaction"]


def test_a_job_that_swallows_its_timeout_is_hard_stopped_and_the_worker_exits(env):
	"""The job catches rq's JobTimeoutException and loops on: --hard-stop-after (60 s by default) past its timeout the
	worker records it as failed and exits 1 (its supervisor starts a new one), as the forking worker's
	parent kills such a work-horse; the job's connection ends with the process (its insert rolled back),
	the next job stays queued and a new worker runs it on a new backend."""
	tag = f"stubborn-{uuid.uuid4().hex[:8]}"
	marker = marker_file()
	ids = _stubborn_job(tag, marker)
	with running_worker("--no-scheduler", "--hard-stop-after", str(HARD_STOP_AFTER)) as proc:
		output, _ = proc.communicate(timeout=600)  # it exits by itself
	stuck = int(Path(marker).read_text())
	os.unlink(marker)
	assert proc.returncode == 1, output[-3000:]
	results, queued = fetch(ids)
	assert [r["status"] for r in results] == ["finished", "failed", "queued"] and queued == 1
	assert results[0]["value"]["backend"] == stuck  # the kept connection was the one the job used
	_assert_hard_stopped(env, results[1], ids[1], tag, stuck)
	done = worker("--no-scheduler")
	assert done.returncode == 0, done.stderr[-3000:]
	(after,), _ = fetch(ids[2:])
	assert after["status"] == "finished" and after["value"]["backend"] != stuck


def test_a_job_that_swallows_its_timeout_is_hard_stopped_and_respawn_goes_on(env):
	"""The same under --respawn (a Procfile's worker, where honcho stops the whole bench when one process
	exits): the hard stop replaces the process with a fresh interpreter (same pid), which runs the next
	job on a new backend; the burst run then ends with 0."""
	tag = f"stubborn-{uuid.uuid4().hex[:8]}"
	marker = marker_file()
	ids = _stubborn_job(tag, marker)
	done = worker("--no-scheduler", "--respawn", "--hard-stop-after", str(HARD_STOP_AFTER))
	stuck = int(Path(marker).read_text())
	os.unlink(marker)
	assert done.returncode == 0, done.stderr[-3000:]
	results, queued = fetch(ids)
	assert [r["status"] for r in results] == ["finished", "failed", "finished"] and queued == 0
	first, _, after = results
	_assert_hard_stopped(env, results[1], ids[1], tag, stuck)
	assert first["value"]["pid"] == after["value"]["pid"] and after["value"]["run"] == 1  # exec'd afresh
	assert first["value"]["backend"] == stuck and after["value"]["backend"] != stuck


# -- shutdown ------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_current_job_then_exits(env):
	"""SIGTERM while a job runs: the job finishes and commits, the next queued job is left queued, the
	worker exits 0 (rq's warm shutdown)."""
	tag = f"warm-{uuid.uuid4().hex[:8]}"
	marker = marker_file()
	ids = enqueue(
		[
			(SITE, "Administrator", "sleep_in_python", {"seconds": 3, "marker": marker, "tag": tag}),
			(SITE, "Administrator", "backend"),
		]
	)
	with running_worker("--no-scheduler") as proc:
		wait_for(lambda: os.path.exists(marker), "the job started")
		proc.send_signal(signal.SIGTERM)
		output, _ = proc.communicate(timeout=120)
	os.unlink(marker)
	results, queued = fetch(ids)
	assert proc.returncode == 0, output[-3000:]
	assert [r["status"] for r in results] == ["finished", "queued"] and queued == 1
	assert count_todos(env["upstream"], SITE, tag) == 1


def test_a_second_sigterm_stops_a_job_blocked_in_a_query(env):
	"""SIGTERM, then SIGTERM again, while the job waits in `SELECT pg_sleep(600)` (where no Python signal
	handler can run): the query is cancelled, the job fails, the worker exits; nothing is left running."""
	marker = marker_file()
	ids = enqueue([(SITE, "Administrator", "sleep_in_query", {"seconds": 600, "marker": marker}, 1500)])
	with running_worker("--no-scheduler") as proc:
		wait_for(lambda: os.path.exists(marker), "the job started")
		backend = int(Path(marker).read_text())
		wait_for(
			lambda: any(
				pid == backend and "pg_sleep" in (q or "") for pid, _, q in sessions(env["upstream"], SITE)
			),
			"the job's query runs",
		)
		proc.send_signal(signal.SIGTERM)
		# rq takes a second signal read within 1 s of the first for a duplicate, timed when the worker's
		# watcher reads them (nothing outside shows when): only the lower bound matters, so far above it.
		# Not sent again until it leaves: a third signal would raise in rq's shutdown path
		time.sleep(5)
		proc.send_signal(signal.SIGTERM)
		output, _ = proc.communicate(timeout=120)
	os.unlink(marker)
	(result,), _ = fetch(ids)
	assert proc.returncode == 0, output[-3000:]
	assert result["status"] == "failed"
	assert "QueryCanceled" in result["exc"] or "canceling statement" in result["exc"]
	assert not [s for s in sessions(env["upstream"], SITE) if "pg_sleep" in (s[2] or "") and s[1] == "active"]


# -- recycling -----------------------------------------------------------------------------------------


def test_the_worker_recycles_after_max_jobs_with_jitter(env):
	"""--max-jobs 10: the process stops after 9 to 11 jobs (+-10%) and exits 0; the rest stay queued."""
	ids = enqueue([(SITE, "Administrator", "backend")] * 25)
	done = worker("--no-scheduler", "--max-jobs", "10")
	assert done.returncode == 0, done.stderr[-3000:]
	results, queued = fetch(ids)
	finished = sum(r["status"] == "finished" for r in results)
	assert 9 <= finished <= 11 and queued == 25 - finished
	assert "recycling after" in done.stdout + done.stderr


def test_the_worker_recycles_above_its_memory_ceiling(env):
	"""--max-memory 1 (MB, below any Python process): it stops after its first job and exits 0."""
	ids = enqueue([(SITE, "Administrator", "backend")] * 3)
	done = worker("--no-scheduler", "--max-memory", "1")
	assert done.returncode == 0, done.stderr[-3000:]
	results, queued = fetch(ids)
	assert [r["status"] for r in results] == ["finished", "queued", "queued"] and queued == 2
	assert "(memory)" in done.stdout + done.stderr


def test_respawn_replaces_the_process_with_a_fresh_interpreter(env):
	"""--respawn --max-jobs 5 over 12 jobs: every job done by the same pid, in three fresh interpreters
	(the job counter kept by the jobs module restarts at 1 after each exec)."""
	ids = enqueue([(SITE, "Administrator", "backend")] * 12)
	done = worker("--no-scheduler", "--max-jobs", "5", "--respawn")
	assert done.returncode == 0, done.stderr[-3000:]
	results, queued = fetch(ids)
	assert [r["status"] for r in results] == ["finished"] * 12 and queued == 0
	assert len({r["value"]["pid"] for r in results}) == 1
	assert [r["value"]["run"] for r in results] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]


# -- the scheduler ---------------------------------------------------------------------------------------

SCHEDULER_LOCK = """
from filelock import FileLock, Timeout
from frappe.utils import get_bench_path
import os
lock = FileLock(os.path.join(get_bench_path(), "config", "scheduler_process"))
try:
    lock.acquire(blocking=False)
    lock.release()
    out(False)
except Timeout:
    out(True)
"""


def test_the_scheduler_runs_in_the_worker(env):
	"""Without --no-scheduler the worker runs Frappe's scheduler in a thread (as Frappe's FrappeWorker of
	worker-pool does): it holds the bench's scheduler lock while it runs, and lets it go when it exits."""
	assert run_in_bench(SCHEDULER_LOCK) == [False]
	with running_worker() as proc:
		wait_for(lambda: run_in_bench(SCHEDULER_LOCK) == [True], "the scheduler took the bench's lock")
		proc.send_signal(signal.SIGTERM)
		output, _ = proc.communicate(timeout=120)
	assert proc.returncode == 0, output[-3000:]
	assert run_in_bench(SCHEDULER_LOCK) == [False]


# -- Frappe 16's FrappeWorkerNoFork shape ----------------------------------------------------------------

# Frappe 16's FrappeWorkerNoFork (frappe/utils/background_jobs.py on develop), rebuilt on Frappe 15's
# FrappeWorker and rq 1.15 (v16's prepare_execution is rq 2's; set_state here), run as v16's
# start_worker_pool runs it with FRAPPE_BACKGROUND_WORKERS_NOFORK=1: a WorkerPool of such workers.
V16_NOFORK_POOL = """
import frappe
from rq.timeouts import JobTimeoutException
from rq.worker import StopRequested, WorkerStatus
from rq.worker_pool import WorkerPool
from frappe.utils.background_jobs import FrappeWorker, get_redis_conn, get_queue_list

class FrappeWorkerNoFork(FrappeWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.push_exc_handler(self.no_fork_exception_handler)

    def execute_job(self, job, queue):
        self.set_state(WorkerStatus.BUSY)
        self.perform_job(job, queue)
        self.set_state(WorkerStatus.IDLE)

    def no_fork_exception_handler(self, job, exc_type, exc_value, traceback):
        if isinstance(exc_value, JobTimeoutException):
            raise StopRequested

with frappe.init_site():
    conn = get_redis_conn()
    queues = get_queue_list(["{queue}"], build_queue_name=True)
WorkerPool(queues, connection=conn, num_workers=2, worker_class=FrappeWorkerNoFork).start(logging_level="WARNING", burst=True)
out("done")
"""


def test_frappe16_nofork_worker_shape_pools_without_anything_else(env):
	"""v16's no-fork worker runs jobs under perform_job, not rq's main_work_horse: the pool keeps the
	connection across jobs with nothing more (at most one login per pool worker for 200 jobs)."""
	bouncer = env["bouncer"]
	ids = enqueue([(SITE, "Administrator", "backend")] * 200)
	before = bouncer.logins(db_name(SITE))
	run_in_bench(V16_NOFORK_POOL.format(queue=QUEUE))
	logins = bouncer.logins(db_name(SITE)) - before
	results, queued = fetch(ids)
	print(f"\nv16 no-fork shape: 200 jobs -> {logins} logins")
	assert [r["status"] for r in results] == ["finished"] * 200 and queued == 0
	workers = {r["value"]["pid"] for r in results}
	assert 1 <= logins <= len(workers) <= 2
