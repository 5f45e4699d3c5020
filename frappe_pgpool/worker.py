"""A no-fork RQ worker for Frappe 15: `bench pgpool worker`, run instead of `bench worker`.

Frappe 15's worker forks a work-horse per job, which logs in to the database, runs the job and exits:
one login per job. This worker runs Frappe's own job execution (frappe.utils.background_jobs.execute_job:
init, connect, run, commit or rollback, destroy) in the worker process itself, as rq's SimpleWorker and
Frappe 16's FrappeWorkerNoFork do, so the pool keeps each site's connection across jobs. What the forking
worker gives operators is kept:

- the job timeout (rq's SIGALRM death penalty) ends the job, not the worker. A job blocked in a query does
  not see a Python signal until the query returns, so a watchdog thread, woken by the signal itself
  (signal.set_wakeup_fd), cancels the query the job's main thread is waiting on. The connection a timed-out
  or interrupted job was using is closed, never reused: the watchdog marks it, and after the job the site's
  pooled connections of this process are closed (the next job of that site logs in afresh);
- a job still running HARD_KILL_AFTER past its timeout (its timeout's exception swallowed, or stuck in a C
  call) is recorded as failed and the process goes with the job's connection: it exits 1, or (respawn)
  execs a fresh interpreter, as the forking worker's parent kills such a work-horse;
- the watchdog sends rq's heartbeats through a job, as the forking worker's parent does: if this process
  dies, the job's started-registry entry lapses as soon, and rq's cleanup records the job as failed;
- a job's exception is recorded as in plain Frappe (execute_job's Error Log, rq's failed registry);
- memory stays bounded: the process stops after `max_jobs` jobs (+-10% jitter, so that workers started
  together do not recycle together) or after a job that leaves its RSS above `max_memory_mb`, and exits 0
  for its supervisor to start a fresh one, or (respawn) replaces itself with a fresh interpreter (exec);
- SIGTERM (or SIGINT) finishes the current job and exits (rq's warm shutdown); a second one, a second or
  more later, stops the job (rq's cold shutdown raises SystemExit into it; a job blocked in a query has
  that query cancelled first);
- a job never sees what the previous one left in frappe.local: execute_job's destroy releases it, and
  where an interruption kept destroy from finishing, the worker does it before the next job;
- Frappe's scheduler runs in a thread of the worker, as in Frappe's FrappeWorker (worker-pool); the
  bench's scheduler lock keeps it to one per bench (none here while `bench schedule` runs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import signal
import sys
import threading
import time

from frappe.utils.background_jobs import FrappeWorker
from rq.timeouts import BaseTimeoutException, UnixSignalDeathPenalty
from rq.utils import utcnow
from rq.worker import SimpleWorker, Worker, WorkerStatus

log = logging.getLogger("frappe_pgpool")

DEFAULT_MAX_JOBS = 1000
DEFAULT_MAX_MEMORY_MB = 1024
JITTER = 0.10
# How long the watchdog lets the main thread run a signal's Python handler before it concludes the
# thread is blocked in a query (a C call, where no Python handler runs) and cancels that query.
HANDLER_GRACE = 1.0
# A job still running this long after its timeout (blocked in a C call no cancel reaches) takes the
# process down, as the forking worker's parent kills a work-horse at timeout + 60 s.
HARD_KILL_AFTER = 60.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
	"""Resident set size of this process (Linux /proc/self/statm)."""
	with open("/proc/self/statm", "rb") as f:
		return int(f.read().split()[1]) * _PAGE


def jittered(max_jobs: int, jitter: float = JITTER) -> int:
	"""max_jobs +- jitter (at least 1): workers started together do not all recycle at once."""
	spread = round(max_jobs * jitter)
	return max(1, max_jobs + random.randint(-spread, spread))


class _DeathPenalty(UnixSignalDeathPenalty):
	"""rq's SIGALRM death penalty, telling the worker when its Python handler ran (the watchdog's cue)."""

	worker: PooledWorker | None = None

	def handle_death_penalty(self, signum, frame):
		worker = type(self).worker
		if worker is not None:
			worker._alarmed.set()
		super().handle_death_penalty(signum, frame)


def _interrupted(exc: BaseException | None) -> bool:
	"""Whether a job ended so that the connection it used may be mid-query or broken: its timeout, a
	SystemExit / KeyboardInterrupt (cold shutdown), a connection or server-side failure. A job that
	failed in its own code (a validation error) left a sound connection: Frappe rolled it back and
	committed the Error Log on it."""
	if exc is None:
		return False
	if isinstance(exc, BaseTimeoutException) or not isinstance(exc, Exception):
		return True
	try:
		import psycopg2
	except ImportError:  # pragma: no cover
		return False
	return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError | psycopg2.InternalError)


class PooledWorker(FrappeWorker, SimpleWorker):
	"""Frappe's FrappeWorker (scheduler thread) running every job in-process (rq's SimpleWorker)."""

	death_penalty_class = _DeathPenalty

	def __init__(
		self,
		*args,
		max_jobs: int | None = DEFAULT_MAX_JOBS,
		max_memory_mb: int | None = DEFAULT_MAX_MEMORY_MB,
		scheduler: bool = True,
		hard_stop_after: float = HARD_KILL_AFTER,
		**kwargs,
	) -> None:
		super().__init__(*args, **kwargs)
		self.hard_stop_after = hard_stop_after  # seconds past a job's timeout before the process goes
		self.max_jobs = jittered(max_jobs) if max_jobs else None
		self.max_memory = max_memory_mb * 1024 * 1024 if max_memory_mb else None
		self.scheduler_thread = scheduler
		self.jobs_done = 0
		self.recycled: str | None = None  # why the worker stopped to be replaced: "max_jobs" or "memory"
		self.signalled = False  # stopped by SIGTERM / SIGINT: never respawned
		self.respawn = False  # a hard stop execs a fresh interpreter instead of exiting 1 (start_worker)
		self.rss_start = 0
		self._job = None  # (job, queue, monotonic start) while a job runs
		self._last_beat = 0.0  # monotonic time of the watchdog's last heartbeat for the running job
		self._exc: BaseException | None = None  # what the running job raised (handle_exception)
		# the main thread ran the Python handler of this job's SIGALRM / of a cold shutdown (watchdog's cue)
		self._alarmed = threading.Event()
		self._forced = threading.Event()
		self._main = threading.main_thread().ident
		self._lock = threading.Lock()
		self.push_exc_handler(self._record_exception)

	# -- the loop ---------------------------------------------------------------------------------

	def work(self, *args, **kwargs):
		kwargs.setdefault("max_jobs", self.max_jobs)
		self.rss_start = rss_bytes()
		rfd, wfd = os.pipe()
		os.set_blocking(wfd, False)
		previous = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
		_DeathPenalty.worker = self
		threading.Thread(target=self._watch, args=(rfd,), name="pgpool-job-watchdog", daemon=True).start()
		try:
			result = (FrappeWorker.work if self.scheduler_thread else SimpleWorker.work)(
				self, *args, **kwargs
			)
		finally:
			signal.set_wakeup_fd(previous)
			_DeathPenalty.worker = None
			os.close(wfd)
		if self.recycled is None and self.max_jobs and self.jobs_done >= self.max_jobs:
			self.recycled = "max_jobs"
		if self.recycled:
			self.log.info(
				"Worker %s: recycling after %d jobs (%s), RSS %.0f MB (%.0f MB at start)",
				self.key,
				self.jobs_done,
				self.recycled,
				rss_bytes() / 2**20,
				self.rss_start / 2**20,
			)
		return result

	def run_maintenance_tasks(self, *args, **kwargs):
		if self.scheduler_thread:
			return super().run_maintenance_tasks(*args, **kwargs)
		return SimpleWorker.run_maintenance_tasks(self, *args, **kwargs)

	def execute_job(self, job, queue):
		"""Run the job here (rq's perform_job: death penalty, result, failure registry), then clean up."""
		self.set_state(WorkerStatus.BUSY)
		self._exc = None
		self._alarmed.clear()
		with self._lock:
			self._job = (job, queue, time.monotonic())
			self._last_beat = 0.0
		try:
			self.perform_job(job, queue)
		finally:
			with self._lock:
				self._job = None
			self._after_job(job)
			self.set_state(WorkerStatus.IDLE)
		self.jobs_done += 1
		if self.max_memory and rss_bytes() > self.max_memory and not self._stop_requested:
			self.recycled = "memory"
			self._stop_requested = True  # rq's loop stops before the next job

	def get_heartbeat_ttl(self, job) -> int:
		# The forking worker's (its parent heartbeats through the job), not SimpleWorker's timeout + 60:
		# the watchdog heartbeats as that parent does (_beat_if_due), so the started registry's entry of a
		# job whose process died lapses as soon as under the forking worker.
		return Worker.get_heartbeat_ttl(self, job)

	def _record_exception(self, job, exc_type, exc_value, traceback):
		self._exc = exc_value
		return True  # on to rq's other handlers

	def _after_job(self, job) -> None:
		"""What the job may have left: an frappe.local not released, a connection mid-query."""
		import frappe

		from .pool import registry

		interrupted = _interrupted(self._exc)
		site = (job.kwargs or {}).get("site") if job.kwargs else None
		if getattr(frappe.local, "site", None) is not None or getattr(frappe.local, "initialised", False):
			# execute_job's destroy did not finish (an exception raised into its finally): the next
			# job's frappe.init would return at once and run on this job's site, user and flags.
			db = getattr(frappe.local, "db", None)
			conn = getattr(db, "_conn", None) if db is not None else None
			if conn is not None:
				registry.mark(conn, "job_interrupted")
			try:
				frappe.destroy()
			except BaseException:
				self.log.warning("frappe_pgpool worker: destroy after job %s failed", job.id, exc_info=True)
			finally:
				from werkzeug.local import release_local

				release_local(frappe.local)
			interrupted = True
		if interrupted and site:
			# Never reuse a connection the job may have left mid-query: this process's connections of
			# the site are closed now (one in use elsewhere, by the scheduler thread, on its return).
			registry.close_site(site)

	# -- signals ----------------------------------------------------------------------------------

	def request_stop(self, signum, frame):
		self.signalled = True
		return super().request_stop(signum, frame)

	def request_force_stop(self, signum, frame):
		self._forced.set()
		return super().request_force_stop(signum, frame)

	def _watch(self, rfd: int) -> None:
		"""Thread: woken by every signal the process gets (set_wakeup_fd) and once a second."""
		first_term = None
		while True:
			try:
				ready, _, _ = select.select([rfd], [], [], 1.0)
				data = os.read(rfd, 64) if ready else b""
			except OSError:
				data = None
			if data is None or (ready and not data):  # work() is over: the write end is closed
				os.close(rfd)
				return
			for signum in data:
				if signum == signal.SIGALRM:
					self._cancel_if_blocked("job timeout", self._alarmed)
				elif signum in (signal.SIGTERM, signal.SIGINT):
					now = time.monotonic()
					# rq takes a second signal within 1 s of the first for a duplicate (worker pools)
					if first_term is not None and now - first_term >= 1.0:
						self._cancel_if_blocked("cold shutdown", self._forced)
					first_term = first_term or now
			self._hard_stop_if_stuck()
			self._beat_if_due()

	def _cancel_if_blocked(self, why: str, handled: threading.Event) -> None:
		"""Give the main thread HANDLER_GRACE to run the signal's handler; if it did not, it is blocked in
		a query: cancel that query (the handler then runs) and mark the connection to be closed."""
		if self._job is None or handled.wait(HANDLER_GRACE):
			return
		if self._job is None:
			return
		db = _blocked_database(self._main)
		conn = getattr(db, "_conn", None) if db is not None else None
		if conn is None or conn.closed:
			return
		from .pool import registry

		registry.mark(conn, "job_interrupted")
		log.warning("frappe_pgpool worker: %s while the job waits on a query: cancelling the query", why)
		try:
			conn.cancel()
		except Exception:
			log.warning("frappe_pgpool worker: cancelling the query failed", exc_info=True)

	def _beat_if_due(self) -> None:
		"""Every job_monitoring_interval of a job, the heartbeats the forking worker's parent sends (the main
		thread is in the job): the worker's key and the job's entry in the started registry are kept for
		job_monitoring_interval + 60 s at a time, so that when this process dies (SIGKILL, the OOM killer)
		rq's registry cleanup records the job as failed (AbandonedJobError) that soon after."""
		with self._lock:
			current = self._job
			if current is None:
				return
			job, _queue, started = current
			now = time.monotonic()
			if now - max(started, self._last_beat) < self.job_monitoring_interval:
				return
			self._last_beat = now
		try:
			self.set_current_job_working_time(now - started)
			self.maintain_heartbeats(job)  # xx: a job ended meanwhile is not put back in the registry
		except Exception:
			log.warning("frappe_pgpool worker: heartbeat of job %s failed", job.id, exc_info=True)

	def _hard_stop_if_stuck(self) -> None:
		with self._lock:
			current = self._job
		if current is None:
			return
		job, queue, started = current
		timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
		if timeout is None or timeout < 0 or time.monotonic() - started < timeout + self.hard_stop_after:
			return
		log.critical(
			"frappe_pgpool worker: job %s still running %ss after its %ss timeout: %s",
			job.id,
			self.hard_stop_after,
			timeout,
			"replacing the process" if self.respawn else "exiting",
		)
		# The job's thread cannot be stopped: the process goes, and with it the job's connection (its
		# transaction rolls back) and whatever the job left in this interpreter.
		try:
			job.ended_at = job.ended_at or utcnow()
			self.handle_job_failure(
				job,
				queue=queue,
				exc_string=f"Job not stopped {self.hard_stop_after}s after its timeout; worker "
				+ ("replaced" if self.respawn else "exited"),
			)
			self.register_death()  # not left listed as busy on this job until its key expires
		except Exception:
			log.exception("frappe_pgpool worker: recording the hard stop of job %s failed", job.id)
		finally:
			if self.respawn:
				_respawn(close=False)  # no checkin from this thread: the descriptors close at exec
			os._exit(1)


def _blocked_database(thread_id: int | None):
	"""The Frappe Database whose sql() the thread is in, or None."""
	frame = sys._current_frames().get(thread_id)
	while frame is not None:
		if frame.f_code.co_name in ("sql", "execute") and "self" in frame.f_code.co_varnames:
			candidate = frame.f_locals.get("self")
			if hasattr(candidate, "_conn") and type(candidate).__module__.startswith("frappe.database"):
				return candidate
		frame = frame.f_back
	return None


def set_process_budget(connections: int) -> None:
	"""This process keeps up to `connections` connections across all sites (db_pool_process_budget for
	this process only): a worker going round N busy sites keeps one for each with N, where "auto" keeps
	one (what a forking worker has open at once) and logs in again whenever the site changes. Pinned: a
	db_pool_process_budget in common_site_config.json, which the web processes apply, does not replace it.
	"""
	from .pool import registry

	registry.pin_process_budget(connections)


def start_worker(
	queue: str | None = None,
	quiet: bool = False,
	burst: bool = False,
	max_jobs: int | None = DEFAULT_MAX_JOBS,
	max_memory_mb: int | None = DEFAULT_MAX_MEMORY_MB,
	scheduler: bool = True,
	respawn: bool = False,
	process_budget: int | None = None,
	hard_stop_after: float = HARD_KILL_AFTER,
) -> PooledWorker:
	"""Frappe's start_worker (same queues, Redis, niceness, logging) with the PooledWorker."""
	import frappe
	from frappe.utils import background_jobs as bj
	from rq.logutils import setup_loghandlers

	if hasattr(bj, "_start_sentry"):
		bj._start_sentry()
	bj._freeze_gc()
	with frappe.init_site():
		redis_connection = bj.get_redis_conn()
		queues = bj.get_queue_list(
			[q.strip() for q in queue.split(",")] if queue else None, build_queue_name=True
		)
	if os.environ.get("CI"):
		setup_loghandlers("ERROR")
	bj.set_niceness()
	if process_budget:
		set_process_budget(process_budget)
	worker = PooledWorker(
		queues,
		connection=redis_connection,
		max_jobs=max_jobs,
		max_memory_mb=max_memory_mb,
		scheduler=scheduler,
		hard_stop_after=hard_stop_after,
	)
	worker.respawn = respawn
	worker.work(
		logging_level="WARNING" if quiet else "INFO",
		burst=burst,
		date_format="%Y-%m-%d %H:%M:%S",
		log_format="%(asctime)s,%(msecs)03d %(message)s",
	)
	if respawn and worker.recycled and not worker.signalled:
		_respawn()
	return worker


def _respawn(close: bool = True) -> None:
	"""Replace this process with a fresh interpreter running the same command (same pid: a Procfile's
	honcho, which stops everything when one process exits, or a Kubernetes container, whose restarts of a
	process that exits often back off, keep a worker without a restart). close: end the pools' sessions
	first (a hard stop does not: the stuck job holds a connection, and the exec closes them all)."""
	from .pool import registry

	if close:
		registry.close_all()  # the new interpreter has its own pools: end these sessions as plain Frappe does
	signal.alarm(0)  # a pending alarm would survive the exec
	for fd in _open_descriptors():
		# libpq and Python's own sockets are close-on-exec already; any other library's socket must not
		# live on, unknown, in the new interpreter (a session left idle in transaction)
		with contextlib.suppress(OSError):
			os.set_inheritable(fd, False)
	sys.stdout.flush()
	sys.stderr.flush()
	module = _main_module()
	argv = [sys.executable, "-m", module, *sys.argv[1:]] if module else [sys.executable, *sys.argv]
	os.execv(sys.executable, argv)


def _open_descriptors() -> list[int]:
	"""This process's file descriptors above stderr."""
	try:
		return [fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2]
	except OSError:  # no /proc: nothing more than Python's and libpq's own close-on-exec
		return []


def _main_module() -> str | None:
	"""The module run with -m (the bench CLI runs `python -m frappe.utils.bench_helper`), or None."""
	spec = getattr(sys.modules.get("__main__"), "__spec__", None)
	return spec.name if spec is not None else None
