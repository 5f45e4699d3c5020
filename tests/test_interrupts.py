"""Interrupted callers and re-entrant callbacks, on real servers (issue 11 items 4, 5, 7).

A caller can be interrupted anywhere: RQ's job timeout raises from a SIGALRM handler, Ctrl-C raises
KeyboardInterrupt, gevent raises its Timeout; and the cyclic garbage collector can run a finalizer in
the middle of any allocation, including one made while the pool's lock is held. None of these may
leave the pool's accounting wrong, hand a connection to nobody, or deadlock.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import signal
import threading
import time

import pytest

from frappe_pgpool import frappe_layer
from frappe_pgpool.pool import ConnectionPool, PoolConfig, PoolRegistry, ProcessBudget

from .conftest import HANG, backend_pid, frappe_like_factory, key_for, wait_for


class JobTimeout(BaseException):
	"""What an interruption looks like to the pool: raised into the thread from outside."""


class RQJobTimeout(Exception):
	"""RQ's own: rq.timeouts.JobTimeoutException derives from Exception, so an `except Exception` meant for
	a failed round trip would swallow it, and the job would run on past its timeout."""


def raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> None:
	"""Schedule exc_type in `thread`: raised as soon as it runs Python code again (as on a wake-up)."""
	done = ctypes.pythonapi.PyThreadState_SetAsyncExc(
		ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type)
	)
	assert done == 1


class alarm:
	"""signal.setitimer + a SIGALRM handler raising JobTimeout (or `exc`), as RQ's job timeout does.

	when=predicate: no timer; SIGALRM is sent once the predicate holds (polled from a thread), so the
	interruption lands at a known point of the code under test, never at a guessed delay.
	"""

	def __init__(self, seconds: float | None, exc: type[BaseException] = JobTimeout, when=None) -> None:
		self.seconds = seconds
		self.exc = exc
		self.when = when
		self.sent = threading.Event()
		self._stop = threading.Event()

	def _watch(self, main: int) -> None:
		deadline = time.monotonic() + 60  # a hang detector
		while not self._stop.is_set() and time.monotonic() < deadline:
			if self.when():
				signal.pthread_kill(main, signal.SIGALRM)
				self.sent.set()  # after the signal: whoever waits for it may let the interrupted call return
				return
			time.sleep(0.005)

	def __enter__(self):
		def handler(signum, frame):
			raise self.exc(f"job exceeded {self.seconds}s")

		self.previous = signal.signal(signal.SIGALRM, handler)
		if self.when is None:
			signal.setitimer(signal.ITIMER_REAL, self.seconds)
		else:
			self.watcher = threading.Thread(target=self._watch, args=(threading.get_ident(),), daemon=True)
			self.watcher.start()
		return self

	def __exit__(self, *exc):
		signal.setitimer(signal.ITIMER_REAL, 0)
		if self.when is not None:
			self._stop.set()
			self.watcher.join()
		signal.signal(signal.SIGALRM, self.previous)
		return False


def accounting(pool: ConnectionPool) -> tuple[int, int, int, int, int]:
	snap = pool.snapshot()
	return snap["size"], snap["idle"], snap["in_use"], snap["opening"], snap["waiting"]


# -- item 4: the abandoned-connection finalizer, run by the cyclic GC under the pool lock --------------


def test_gc_finalizer_run_while_the_pool_lock_is_held_does_not_deadlock(bouncer, monkeypatch):
	"""A Database dropped without close() is collected by the cyclic GC, which can run inside any
	allocation, also one made under the pool's (non-reentrant) lock; its finalizer gives the connection
	back. Here the GC runs from the pool's clock, which the pool reads under its lock."""
	reg = PoolRegistry(reap_interval=0)
	monkeypatch.setattr(frappe_layer, "registry", reg)
	key = key_for(bouncer=bouncer, site="gc-finalizer")
	config = PoolConfig(size=3, timeout=2, leak_warning=30)
	connect = frappe_like_factory(bouncer)
	pool = reg.pool(key, config)
	collect_now = threading.Event()
	under_lock = []
	real_clock = pool._clock

	def clock() -> float:
		if collect_now.is_set() and pool._lock.locked():
			collect_now.clear()
			under_lock.append(True)
			gc.collect()
		return real_clock()

	pool._clock = clock

	class Database:  # Frappe's Database object: part of a reference cycle, so only the GC frees it
		def __init__(self) -> None:
			self.me = self

	deadlocked = False
	gc.disable()
	try:
		db = Database()
		abandoned = reg.getconn(key, config, connect)
		# exactly what frappe_layer.get_connection registers for each checkout
		frappe_layer._watch(db, abandoned)
		del db
		collect_now.set()
		got: list = []
		t = threading.Thread(target=lambda: got.append(reg.getconn(key, config, connect)), daemon=True)
		t.start()
		t.join(HANG)
		deadlocked = t.is_alive()
		assert not deadlocked, "the finalizer deadlocked on the pool lock"
		assert under_lock == [True] and len(got) == 1
		reg.putconn(got[0])  # the next return (or checkout, or reaper round) drains the queued finalizer
		snap = pool.snapshot()
		assert (snap["in_use"], snap["idle"], snap["closed"]) == (0, 1, {"discarded": 1})
		assert abandoned.closed
	finally:
		gc.enable()
		if not deadlocked:
			reg.close_all()


def test_finalizer_queued_while_the_process_is_quiet_is_drained_by_the_reaper(bouncer, monkeypatch):
	reg = PoolRegistry(reap_interval=0.1)
	monkeypatch.setattr(frappe_layer, "registry", reg)
	key = key_for(bouncer=bouncer, site="gc-reaper")
	config = PoolConfig(size=2, timeout=2)
	conn = reg.getconn(key, config, frappe_like_factory(bouncer))
	frappe_layer._abandoned(conn)  # what the finalizer does, from wherever the GC happens to run
	try:
		# the reaper counts the slot free under the lock and closes the socket after it: wait for both
		wait_for(lambda: conn.closed and reg.pool(key, config).snapshot()["in_use"] == 0, "closed and freed")
		assert reg.pool(key, config).snapshot()["closed"] == {"discarded": 1}
	finally:
		reg.close_all()


# -- item 5: waiters that give up, and a return interrupted during its reset --------------------------


@pytest.mark.parametrize("discard", [False, True], ids=["returned", "discarded"])
def test_a_waiter_interrupted_by_sigalrm_leaves_no_ghost(bouncer, discard):
	# callers wait only for the process budget; the one held by another thread (a thread holding a
	# checkout never waits: an overdraft), as SIGALRM reaches the main thread only
	pool = ConnectionPool("site ghost.local", PoolConfig(size=1, timeout=5), budget=ProcessBudget(setting=1))
	connect = frappe_like_factory(bouncer)
	got: list = []
	holder = threading.Thread(target=lambda: got.append(pool.getconn(connect)))
	holder.start()
	holder.join(HANG)
	(held,) = got
	with alarm(0.2), pytest.raises(JobTimeout):  # the alarm ends the wait, not db_pool_timeout
		pool.getconn(connect)
	assert pool.snapshot()["timeouts"] == 0
	assert accounting(pool) == (1, 0, 1, 0, 0)  # size, idle, in_use, opening, waiting: no ghost queued
	pool.putconn(held, discard=discard)
	waits = pool.snapshot()["waits"]
	conn = pool.getconn(connect, timeout=1)  # the next caller is served at once: no ghost ahead of it
	assert (pool.snapshot()["waits"], pool.snapshot()["timeouts"]) == (waits, 0)  # it never queued
	assert accounting(pool) == (1, 0, 1, 0, 0)
	pool.putconn(conn)
	assert accounting(pool) == (1, 1, 0, 0, 0)
	pool.close()


@pytest.mark.parametrize("discard", [False, True], ids=["handed-a-connection", "granted-a-slot"])
def test_a_hand_off_to_a_waiter_that_gave_up_goes_to_the_next_caller(bouncer, discard):
	"""The exception reaches the waiter just as it is woken by the hand-off: the connection (or the
	slot to open one) it was given must not be lost with it."""
	pool = ConnectionPool(
		"site handoff.local", PoolConfig(size=1, timeout=5), budget=ProcessBudget(setting=1)
	)
	connect = frappe_like_factory(bouncer)
	held = pool.getconn(connect)
	pid = backend_pid(held)
	outcome: list[BaseException] = []

	def waiter() -> None:
		try:
			outcome.append(pool.getconn(connect))
		except BaseException as e:
			outcome.append(e)

	t = threading.Thread(target=waiter)
	t.start()
	wait_for(lambda: pool.snapshot()["waiting"] == 1)
	raise_in_thread(t, JobTimeout)  # delivered when it wakes: blocked threads run no Python code
	pool.putconn(held, discard=discard)
	t.join(HANG)
	assert len(outcome) == 1 and isinstance(outcome[0], JobTimeout)
	assert accounting(pool) == ((0, 0, 0, 0, 0) if discard else (1, 1, 0, 0, 0))
	conn = pool.getconn(connect, timeout=1)
	assert (backend_pid(conn) == pid) is not discard  # the reset connection itself, kept warm
	pool.putconn(conn)
	assert accounting(pool) == (1, 1, 0, 0, 0)
	snap = pool.snapshot()  # two checkouts served: the one that gave up is not counted
	assert (snap["checkouts"], snap["hits"] + snap["misses"]) == (2, 2)
	pool.close()


@pytest.mark.parametrize("exc", [JobTimeout, RQJobTimeout], ids=["BaseException", "rq-Exception"])
def test_an_interruption_during_the_reset_frees_the_slot(cluster, bouncer, exc):
	"""putconn's reset is a round trip; an exception raised into it must reach the caller (RQ's job
	timeout is an Exception: swallowed as a failed reset, the job would overrun its timeout), and must
	not keep the slot reserved, nor put a half-reset session back."""
	# the reset waits for a lock this test holds until the interruption is sent: the watcher sees the
	# reset running however slowly it is scheduled (a timed sleep could end before it looked)
	lock = 4242
	pool = ConnectionPool(
		"site reset.local",
		PoolConfig(size=1, timeout=0.5, reset_query=f"SELECT pg_advisory_lock({lock})"),
	)
	connect = frappe_like_factory(bouncer)
	conn = pool.getconn(connect)
	pid = backend_pid(conn)
	admin = cluster.connect()
	holder = cluster.connect("app1")  # advisory locks are per database
	with holder.cursor() as cur:
		cur.execute("SELECT pg_advisory_lock(%s)", (lock,))

	def resetting() -> bool:  # the return's reset query is running on the server, waiting for the lock
		with admin.cursor() as cur:
			cur.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s AND state = 'active'", (pid,))
			row = cur.fetchone()
			return row is not None and row[0] == "advisory"

	def release_once_sent() -> None:  # the signal is taken when the blocked call returns: let it return
		interrupt.sent.wait(HANG)
		with holder.cursor() as cur:
			cur.execute("SELECT pg_advisory_unlock(%s)", (lock,))

	try:
		with alarm(None, exc, when=resetting) as interrupt, pytest.raises(exc):
			releaser = threading.Thread(target=release_once_sent, daemon=True)
			releaser.start()
			pool.putconn(conn)
		releaser.join(HANG)
		assert interrupt.sent.is_set()  # raised by the interruption sent during the reset
	finally:
		admin.close()
		holder.close()
	assert conn.closed  # its session state is unknown: never reused
	assert accounting(pool) == (0, 0, 0, 0, 0)
	assert pool.snapshot()["closed"] == {"reset_failed": 1}
	fresh = pool.getconn(connect, timeout=0.5)
	assert not fresh.closed
	pool.putconn(fresh, discard=True)
	pool.close()


# -- item 7 (pool part): the leak warning ------------------------------------------------------------


def test_leak_warning_after_a_hand_off_shows_the_takers_stack(bouncer, caplog):
	# the pool's clock moves only when the test says: a connection is held "too long" exactly when
	# wanted, however slow the machine (a slow hand-off once made `second` a leak already)
	now = [0.0]
	pool = ConnectionPool(
		"site handoff-leak.local",
		PoolConfig(size=2, timeout=HANG, leak_warning=0.2),
		clock=lambda: now[0],
		budget=ProcessBudget(setting=2),
	)
	connect = frappe_like_factory(bouncer)
	first, second = pool.getconn(connect), pool.getconn(connect)
	got = []

	def taker_waits_for_a_hand_off() -> None:
		got.append(pool.getconn(connect))

	def give_back(conn) -> None:
		pool.putconn(conn)

	def returner_hands_off() -> None:
		give_back(first)

	t = threading.Thread(target=taker_waits_for_a_hand_off)
	t.start()
	wait_for(lambda: pool.snapshot()["waiting"] == 1)
	returner_hands_off()
	t.join(HANG)
	assert got == [first]
	now[0] += 0.3  # both have been out longer than leak_warning; `second` is the one returned
	with caplog.at_level(logging.WARNING, logger="frappe_pgpool"):
		pool.putconn(second)  # a return checks for leaks
	(record,) = [r for r in caplog.records if "checked out for" in r.getMessage()]
	assert "taker_waits_for_a_hand_off" in record.getMessage()
	assert "returner_hands_off" not in record.getMessage()
	pool.putconn(first)
	pool.close()


def test_leak_warning_is_logged_without_holding_the_pool_lock(bouncer):
	now = [0.0]  # the pool's clock, moved by the test: `held` is out too long when it says so
	pool = ConnectionPool("site leak-lock.local", PoolConfig(size=2, leak_warning=0.1), clock=lambda: now[0])
	connect = frappe_like_factory(bouncer)
	lock_free_when_logging: list[bool] = []

	class Probe(logging.Handler):
		def emit(self, record: logging.LogRecord) -> None:
			if "checked out for" in record.getMessage():
				free = pool._lock.acquire(blocking=False)
				if free:
					pool._lock.release()
				lock_free_when_logging.append(free)

	probe = Probe()
	logger = logging.getLogger("frappe_pgpool")
	logger.addHandler(probe)
	try:
		held = pool.getconn(connect)
		now[0] += 0.15
		pool.putconn(pool.getconn(connect))
	finally:
		logger.removeHandler(probe)
	assert lock_free_when_logging == [True]
	pool.putconn(held)
	pool.close()


# -- interruptions after a connection or a slot changed hands: nothing stays counted ----------------


def test_an_interruption_while_a_connection_not_kept_is_closed_frees_its_slot(bouncer, monkeypatch):
	"""The return of a connection the reuse gate did not keep logs leak warnings, then closes it, then
	frees its budget slot; an interruption in between (here while a leak warning is logged) must still
	close it and free the slot, or the process counts a connection that is gone."""
	from frappe_pgpool.pool import budget

	monkeypatch.setattr(budget, "REUSE_MIN_RATE", 2.0)  # shut, once a return is counted
	monkeypatch.setattr(budget, "REUSE_MIN_RATE_ONE_SLOT", 2.0)
	now = [0.0]  # the pools' clock, moved by the test: long_held is out too long when it says so
	reg = PoolRegistry(reap_interval=0, clock=lambda: now[0])
	key = key_for(bouncer=bouncer, site="interrupted-close")
	config = PoolConfig(size=2, timeout=1, leak_warning=0.05)
	connect = frappe_like_factory(bouncer)
	reg.putconn(reg.getconn(key, config, connect), discard=True)  # the first return: the gate shuts
	long_held = reg.getconn(key, config, connect)  # the leak warning the return reports
	held = reg.getconn(key, config, connect)
	assert reg.pools()[key]._in_use[id(held)].defaults is None  # opened not to be kept
	now[0] += 0.1

	class Interrupting(logging.Handler):
		def emit(self, record: logging.LogRecord) -> None:
			raise JobTimeout("while logging the leak warning")

	handler = Interrupting()
	logger = logging.getLogger("frappe_pgpool")
	logger.addHandler(handler)
	try:
		with pytest.raises(JobTimeout):
			reg.putconn(held)
	finally:
		logger.removeHandler(handler)
	assert held.closed
	snap = reg.snapshot()
	assert (snap["open"], snap["active"], snap["in_use"]) == (1, 1, 1)  # long_held's alone
	reg.putconn(long_held)
	snap = reg.snapshot()
	assert (snap["open"], snap["active"], snap["in_use"]) == (0, 0, 0)
	reg.close_all()


def test_a_checkout_interrupted_after_it_was_handed_its_connection_gives_it_back(bouncer, monkeypatch):
	"""getconn records the taker's stack (leak warning on) after the connection is handed out; an
	interruption there must not leave the connection checked out to nobody: it is given back (closed, as
	its caller never used it) and the checkout ends, so the budget counts nothing for this thread."""
	from frappe_pgpool.pool import pool as pool_module

	reg = PoolRegistry(reap_interval=0)
	key = key_for(bouncer=bouncer, site="interrupted-checkout")
	config = PoolConfig(size=2, timeout=1, leak_warning=30)
	connect = frappe_like_factory(bouncer)
	reg.putconn(reg.getconn(key, config, connect))  # one idle: the next checkout is a hit

	def interrupted(*args, **kwargs):
		raise JobTimeout("while the taker's stack is recorded")

	monkeypatch.setattr(pool_module.traceback, "extract_stack", interrupted)
	with pytest.raises(JobTimeout):
		reg.getconn(key, config, connect)
	monkeypatch.undo()
	snap = reg.snapshot()
	assert (snap["active"], snap["in_use"], snap["open"]) == (0, 0, 0)
	assert reg._budget.holders == {}
	conn = reg.getconn(key, config, connect)  # served as usual afterwards
	assert backend_pid(conn)
	reg.putconn(conn)
	reg.close_all()
