"""A bounded, thread-safe, LIFO pool of psycopg2 connections for one connection identity.

No Frappe import. The pool never prefills: connections are opened on demand by the `connect`
callable the caller passes to `getconn` (in Frappe, the original `get_connection`, so whatever
it sets up is kept). Stale idle connections are pruned when the pool is used, and by
`maintain()`, which the registry's reaper thread calls, so that a process that gets no more
traffic still lets go of them (pgBouncer's PAUSE and safe shutdown wait for every client).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions as ext

from .budget import POOL_REUSE_WINDOW, HitWindow, ProcessBudget, Waiter
from .config import PoolConfig
from .connection import (
	Retire,
	SessionDefaults,
	close_quietly,
	disown,
	is_usable,
	reset,
	socket_poller,
)
from .errors import PoolClosed, PoolTimeout
from .record import Record

log = logging.getLogger("frappe_pgpool")

Connect = Callable[[], ext.connection]

# Frames of this package are left out of the stack a leak warning shows: it names the caller.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# A connection's lifetime is shortened by up to this fraction, so that connections opened
# together (a worker's burst at start) do not all expire and reconnect together.
LIFETIME_JITTER = 0.1

# Set while a pool's connect callable runs: whether the pool means to keep what it opens (see opening_to_keep)
_connecting = threading.local()


def opening_to_keep() -> bool:
	"""For a connect callable: whether the pool means to keep the connection being opened in this thread.

	False when the reuse gate is shut (budget.REUSE_MIN_RATE), or when the pool keeps db_pool_size
	connections already: the connection is closed on return as plain Frappe closes it, so whatever only a
	kept connection needs (the Frappe layer's application_name) can be left out. True outside a connect
	callable.
	"""
	return getattr(_connecting, "keep", True)


@dataclass
class PoolStats:
	checkouts: int = 0
	hits: int = 0  # checkouts served by an open connection of this pool (idle, or handed over on return)
	misses: int = 0  # checkouts served by a new connection; checkouts = hits + misses
	over_size: int = 0  # misses opened while the pool kept db_pool_size connections: closed on return
	returns: int = 0
	created: int = 0
	closed: Counter[str] = field(default_factory=Counter)
	evictions: Counter[str] = field(default_factory=Counter)  # idle ones closed for another pool ("budget")
	budget_waits: int = 0  # callers that waited for the process budget (db_pool_process_budget)
	budget_timeouts: int = 0
	connect_errors: int = 0
	timeouts: int = 0
	waits: int = 0
	wait_seconds_total: float = 0.0
	wait_seconds_max: float = 0.0
	recent_waits: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


class ConnectionPool:
	def __init__(
		self,
		name: str,
		config: PoolConfig,
		clock: Callable[[], float] = time.monotonic,
		budget: ProcessBudget | None = None,
	) -> None:
		self.name = name  # shown in errors and stats; never contains a password
		self.config = config
		self.pid = os.getpid()
		self.stats = PoolStats()
		self._clock = clock
		# The registry's pools share one budget and its lock (see budget.py); a pool on its own has its
		# own, without a process-wide limit.
		self._budget = budget if budget is not None else ProcessBudget(bounded=False)
		self._lock = self._budget.lock
		self._idle: list[Record] = []  # most recently returned last: LIFO keeps few connections warm
		self._in_use: dict[int, Record] = {}
		self._opening = 0  # slots reserved by callers that are connecting right now
		self._opening_over = 0  # ... of which over db_pool_size: not to be kept
		self._returning = 0  # connections being reset on their way back
		self._closed = False
		# would-hit of this pool's last checkouts, kept by the budget: its own reuse gate (budget.py)
		self.reuse = HitWindow(POOL_REUSE_WINDOW)
		with self._lock:
			self._budget.join(self)

	# -- checkout ---------------------------------------------------------------------------

	def getconn(self, connect: Connect, timeout: float | None = None) -> ext.connection:
		"""Return an idle connection (no round trip), else open one within the process budget, or wait for
		the budget. db_pool_size bounds what the pool keeps, not what it opens: a checkout that finds the pool
		keeping that many opens one all the same, not kept (closed on return, as plain Frappe closes it)."""
		timeout = self.config.timeout if timeout is None else timeout
		budget = self._budget
		thread = threading.get_ident()
		started = nested = over = False
		waiter = record = conn = None
		try:
			stale: list[tuple[Record, str]] = []
			while True:
				self._close_records(stale)  # outside the lock; a dead idle connection frees its slot
				with self._lock:
					if self._closed:
						raise PoolClosed(f"frappe_pgpool: pool {self.name} is closed")
					if not started:
						nested = budget.checkout_started(thread)  # counts until putconn ends: the peak
						budget.note_checkout(self)
						started = True
					record, stale = self._take_idle()
					if record is not None:
						self._hand_out(record)
						self.stats.hits += 1
						break
					if stale:
						continue
					if not budget.waiters and budget.has_room():
						# nobody queued and room in the budget: a slot at once, as dispatch would grant a
						# lone waiter (the miss path of every request whose connection is not kept)
						budget.open += 1
						over = self._reserve()
						break
					# Nothing idle here: queue, in arrival order across pools, and let the budget serve the
					# queue; it may grant this caller a slot at once (then it does not wait).
					waiter = Waiter(self)
					budget.waiters.append(waiter)
					budget.dispatch()
					if not waiter.may_connect and nested:
						# this thread holds a checkout already: it would wait for itself. Over the
						# budget instead, as plain Frappe would open a second connection.
						budget.open += 1
						budget.overdrafts += 1
						self.grant_slot(waiter, None)
					if waiter.may_connect:
						waiter.done = True
					else:  # the only thing a checkout waits for: the budget (see dispatch)
						self.stats.budget_waits += 1
						budget.waits += 1
					break
			if record is not None:
				conn = record.conn
				self._close_records(stale)
			elif waiter is None:
				conn = self._open(connect, over)
			else:
				if not waiter.done:
					record = self._wait(waiter, timeout)
				if record is not None:
					conn = record.conn
				else:
					conn = self._open_in_slot(connect, waiter.evict, waiter.over_size)
			held = self._in_use.get(id(conn))
			if held is not None:
				held.thread = thread
			if self.config.leak_warning:
				self._note_taker(conn)
			return conn
		except BaseException:
			# Interrupted (RQ's job timeout, KeyboardInterrupt) or failed. A connection already handed to
			# this caller, which will never use it, is given back (closed: the caller's state is unknown)
			# and that ends the checkout; else the checkout ends here.
			if conn is not None:
				taken = conn
			elif record is not None:
				taken = record.conn
			elif waiter is not None and waiter.record is not None:  # handed over, not yet taken from _wait
				taken = waiter.record.conn
			else:
				taken = None
			held = self._in_use.get(id(taken)) if taken is not None else None
			if held is not None and held.conn is taken:
				held.thread = thread
				self.putconn(taken, discard=True)
			elif started:
				with self._lock:
					budget.checkout_ended(thread)
			raise

	def _open_in_slot(self, connect: Connect, evict: Record | None, over: bool) -> ext.connection:
		"""Open a connection in the slot reserved for this caller, closing first the idle one evicted for it."""
		if evict is not None:
			try:
				evict.end()  # before connecting: never more than the budget; waits for no answer
			except BaseException:
				with self._lock:
					self._opening -= 1
					self._opening_over -= over
					self._released()
				raise
		return self._open(connect, over)

	def _note_taker(self, conn: ext.connection) -> None:
		"""Record the stack of the caller that now holds conn, for the leak warning.

		Done by the taker itself, outside the lock: a connection handed over by putconn was given
		out by the returning thread, whose stack says nothing about who holds it now.
		"""
		record = self._in_use.get(id(conn))
		if record is not None and record.conn is conn:
			frames = [f for f in traceback.extract_stack(limit=40) if not f.filename.startswith(_PACKAGE_DIR)]
			record.checkout_stack = "".join(traceback.format_list(frames[-30:]))

	def _take_idle(self) -> tuple[Record | None, list[tuple[Record, str]]]:
		"""Pop the newest usable idle record; collect the stale ones for closing. Under the lock."""
		now = self._clock()
		stale = self._prune_idle(now)
		while self._idle:
			record = self._idle.pop()
			reason = _stale_reason(record, now)
			if reason is None:
				return record, stale
			stale.append((record, reason))
		return None, stale

	def _prune_idle(self, now: float) -> list[tuple[Record, str]]:
		"""Drop the oldest idle records past max_idle. Under the lock."""
		stale = []
		max_idle = self.config.max_idle
		while max_idle and self._idle and now - self._idle[0].returned_at >= max_idle:
			stale.append((self._idle.pop(0), "idle"))
		return stale

	def maintain(self) -> int:
		"""Close idle connections past max_idle or max_lifetime, or found dead. Returns how many."""
		with self._lock:
			if self._closed:
				return 0
			now = self._clock()
			stale = self._prune_idle(now)
			keep = []
			for record in self._idle:
				reason = _stale_reason(record, now)
				if reason is None:
					keep.append(record)
				else:
					stale.append((record, reason))
			self._idle = keep
		self._close_records(stale)
		return len(stale)

	def _hand_out(self, record: Record) -> None:
		record.checked_out_at = self._clock()
		record.leak_reported = False
		record.checkout_stack = None  # set by the taker (_note_taker), not here: this may be a hand-off
		self._in_use[id(record.conn)] = record
		self.stats.checkouts += 1

	def _wait(self, waiter: Waiter, timeout: float) -> Record | None:
		started = self._clock()
		budget = self._budget
		try:
			waiter.event.wait(timeout)
			with self._lock:
				waited = self._clock() - started
				self.stats.waits += 1
				self.stats.wait_seconds_total += waited
				self.stats.wait_seconds_max = max(self.stats.wait_seconds_max, waited)
				self.stats.recent_waits.append(waited)
				waiter.done = True
				if waiter.error is not None:
					raise waiter.error
				if waiter.record is not None or waiter.may_connect:
					return waiter.record  # already handed out (or a slot reserved) by the waker
				budget.waiters.remove(waiter)
				self.stats.timeouts += 1
				self.stats.budget_timeouts += 1  # what it waited for: nothing else makes a checkout wait
				budget.timeouts += 1
				message = self._budget_timeout_message(timeout)
		except BaseException:
			# Raised into the waiting thread (RQ's job timeout from SIGALRM, KeyboardInterrupt) or
			# the pool's own error: a waiter that gives up must not keep its place or what it got.
			self._cancel(waiter)
			raise
		raise PoolTimeout(message)

	def _budget_timeout_message(self, timeout: float) -> str:
		"""Under the lock."""
		budget = self._budget
		setting = f"auto (peak {budget.peak})" if budget.setting is None else budget.setting
		in_use = sum(p.in_use_count() for p in budget.pools)
		return (
			f"frappe_pgpool: no database connection free for {self.name} after {timeout:g}s: the process's "
			f"connection budget is used up (db_pool_process_budget={setting}: {budget.open} open, {in_use} in use "
			f"across {len(budget.pools)} pools, {len(budget.waiters)} other requests waiting). Raise "
			"db_pool_process_budget within pgBouncer's default_pool_size, or find what holds connections "
			"(db_pool_leak_warning)."
		)

	def _cancel(self, waiter: Waiter) -> None:
		"""The waiting caller gave up: pass on what it was handed meanwhile, or leave the queue."""
		record = None
		reason = "budget"  # why the connection left below is closed: an eviction unless said otherwise
		with self._lock:
			if waiter.done:
				return
			waiter.done = True
			if waiter.record is not None:  # handed over just as it gave up: it goes to the next caller
				record, waiter.record = waiter.record, None
				del self._in_use[id(record.conn)]
				self.stats.checkouts -= 1  # counted for the caller that gave up: it never had it
				self.stats.hits -= 1
				reason = self._check_in(record)
				if reason is None:
					return
				self.stats.closed[reason] += 1
			elif waiter.may_connect:  # a slot was reserved for it to open a connection in
				waiter.may_connect = False
				self._opening -= 1
				self._opening_over -= waiter.over_size
				# an idle connection evicted for it is closed all the same; its slot is freed after that
				record, waiter.evict = waiter.evict, None
				if record is None:
					self._released()
					return
			elif waiter in self._budget.waiters:  # not if close() failed it meanwhile
				self._budget.waiters.remove(waiter)
				return
			else:
				return
		# evicted for this caller, which gave up, or closed for another reason (over the budget, the pool
		# closed or shrunk meanwhile): ended as putconn ends it
		self._close_and_release(record.conn, record.end)

	def _open(self, connect: Connect, over: bool = False) -> ext.connection:
		"""Open a connection in a slot already reserved by the caller; `over`: over db_pool_size, not kept."""
		try:
			# the gate is read without the lock: a stale answer costs a close
			keeping = not over and self._budget.reuse_pays(self)
			outer = opening_to_keep()  # a connect callable that itself opens a pooled connection
			_connecting.keep = keeping
			try:
				conn = connect()
			finally:
				_connecting.keep = outer
			defaults = poller = None
			if keeping:
				defaults = SessionDefaults.capture(conn, session=self.config.pgbouncer_mode == "session")
				poller = socket_poller(conn)
		except BaseException:
			with self._lock:
				self._opening -= 1
				self._opening_over -= over
				self.stats.connect_errors += 1
				self._released()
			raise
		now = self._clock()
		# one not kept is closed on return whatever its age: no lifetime to draw
		expires_at = self._expiry(now) if keeping else math.inf
		record = Record(conn, defaults, poller, created_at=now, expires_at=expires_at, over_size=over)
		with self._lock:
			self._opening -= 1
			self._opening_over -= over
			self.stats.created += 1
			self.stats.over_size += over
			if self._closed:
				self.stats.closed["pool_closed"] += 1
				closed = True
			else:
				self._hand_out(record)
				self.stats.misses += 1
				closed = False
		if closed:
			self._close_and_release(conn, close_quietly)
			raise PoolClosed(f"frappe_pgpool: pool {self.name} closed while connecting")
		return conn

	def _expiry(self, created_at: float) -> float:
		lifetime = self.config.max_lifetime
		return created_at + lifetime * (1 - random.uniform(0, LIFETIME_JITTER)) if lifetime else float("inf")

	# -- return -----------------------------------------------------------------------------

	def owns(self, conn: ext.connection) -> bool:
		record = self._in_use.get(id(conn))
		return record is not None and record.conn is conn

	def mark(self, conn: ext.connection, reason: str) -> None:
		"""The holder left session state no reset can undo: the return closes the connection, for `reason`."""
		record = self._in_use.get(id(conn))
		if record is not None and record.conn is conn:
			record.retire = reason

	def putconn(self, conn: ext.connection, discard: bool = False) -> bool:
		"""Take a connection back: reset and keep it, or close it. Never raises, but for an exception
		raised into it (an interruption: the connection is closed and its slot freed first).

		Returns False when the connection is not checked out from this pool (a second return,
		or a foreign connection), which is left untouched.
		"""
		forked = os.getpid() != self.pid
		with self._lock:
			record = self._in_use.get(id(conn))
			if record is None or record.conn is not conn:
				return False
			del self._in_use[id(conn)]
			leaks = self._find_leaks() if self.config.leak_warning else None
			budget = self._budget
			budget.note_return(self)
			if record.defaults is None and not forked:
				# Opened while keeping did not pay: closed whatever the gate says now, as plain Frappe closes
				# it (no rollback, no reset). Decided here without I/O, so one lock section less than a
				# kept connection's return: this is the path of every request whose site would not hit.
				reason = self._retire_reason(record, discard) or (
					"over_size" if record.over_size else "not_reused"
				)
				budget.checkout_ended(record.thread)
				self._count_closed(reason)
			else:
				reason = None
				self._returning += 1  # keeps its slot while it is reset: the size bound holds
				# kept only while keeping pays, or when a caller of this pool is waiting for it
				keep = budget.reuse_pays(self) or any(w.pool is self for w in budget.waiters)
		if reason is not None:
			try:
				if leaks:
					self._log_leaks(leaks)  # outside the lock: logging handlers take locks and allocate
			finally:
				self._close_and_release(conn, close_quietly)
			return True
		try:
			if leaks:
				self._log_leaks(leaks)  # outside the lock: logging handlers take locks and allocate
			if forked:
				disown(conn)  # a child returning its parent's connection: never touch the socket
				reason = "fork"
			else:
				reason = self._retire_reason(record, discard)
				if reason is None and not keep:
					reason = "not_reused"  # closed as plain Frappe closes it: no rollback, no reset
			if reason is None:
				try:
					reset(conn, record.defaults, self.config.reset_query)
				except Retire as e:  # client-side state only a round trip could undo: closed instead
					reason = e.reason
				except (psycopg2.Error, OSError) as e:  # a failed round trip: the session's state is unknown
					# (anything else, RQ's job timeout among them, is an interruption: handled below, raised)
					log.info(
						"frappe_pgpool: closing a connection of %s that failed to reset: %s", self.name, e
					)
					reason = "reset_failed"
			if reason is None:
				record.returned_at = self._clock()
				record.checkout_stack = None
		except BaseException:
			# Interrupted mid-reset (a job timeout, KeyboardInterrupt): the session's state is unknown,
			# so the connection is closed, and its slot freed for the next caller.
			if not forked:
				record.end()  # as every end of a kept connection: pgBouncer drops its server too
			with self._lock:
				self._returning -= 1
				self._budget.checkout_ended(record.thread)
				self.stats.closed["fork" if forked else "reset_failed"] += 1
				self._released()
			raise
		with self._lock:
			self._returning -= 1
			self._budget.checkout_ended(record.thread)  # the checkout ends here, after its reset
			if reason is None:
				self.stats.returns += 1
				reason = self._check_in(record)
				if reason is None:
					return True
			self._count_closed(reason)
		self._close_and_release(conn, None if reason == "fork" else record.end)
		return True

	def _close_and_release(
		self, conn: ext.connection, close: Callable[[ext.connection], None] | None
	) -> None:
		"""Close a connection that has left the pool, then free its budget slot, even when interrupted.

		Counted open until closed: never more than the budget at once. Outside the lock.
		"""
		try:
			if close is not None:
				close(conn)
		finally:
			with self._lock:
				self._released()

	def _count_closed(self, reason: str) -> None:
		"""A returned connection is closed, for `reason`. Under the lock."""
		self.stats.closed[reason] += 1
		if reason == "not_reused":
			self._budget.not_reused += 1

	def _retire_reason(self, record: Record, discard: bool) -> str | None:
		conn = record.conn
		if discard:
			return "discarded"
		if record.retire is not None:
			return record.retire
		if record.defaults is not None and record.defaults.session != (
			self.config.pgbouncer_mode == "session"
		):
			return "reconfigured"  # opened for the other pgBouncer mode: its reset would not fit it
		if conn.closed:
			return "broken"
		status = conn.get_transaction_status()  # no ConnectionInfo object: this is the hot path
		if status == ext.TRANSACTION_STATUS_ACTIVE:
			return "busy"  # a statement still running: state unknown
		if status == ext.TRANSACTION_STATUS_UNKNOWN:
			return "broken"
		if self._clock() >= record.expires_at:
			return "lifetime"
		if self._closed:
			return "pool_closed"
		return None

	def _check_in(self, record: Record) -> str | None:
		"""A clean connection is free: serve the first waiter it can, or keep it idle. Under the lock.

		Every waiter waits for the process budget (see dispatch); the first to arrive is served: a waiter of
		this pool gets it (a hit), one of another pool gets its slot (this connection is evicted for it).
		Returns why it must be closed instead: the process is over its budget (a nested checkout's overdraft
		coming back, or the budget was lowered), checked first, so that no waiter inherits the excess; or
		the pool was closed, or keeps db_pool_size connections without it (the size was lowered while it
		was out).
		"""
		budget = self._budget
		if budget.over_limit():
			self.stats.evictions["budget"] += 1
			budget.evictions += 1
			return "budget"
		if budget.waiters and not self._closed:
			waiter = budget.waiters[0]
			if waiter.pool is self:
				budget.waiters.remove(waiter)
				self._hand_out(record)
				self.stats.hits += 1
				waiter.record = record
				waiter.event.set()
			else:
				self._count_eviction()
				waiter.pool.grant_slot(waiter, record)
			return None
		if not self._closed and self._kept() < self.config.size:
			self._idle.append(record)
			return None
		return "pool_closed" if self._closed else "shrunk"  # size lowered while it was out

	def _count_eviction(self) -> None:
		"""An idle connection of this pool is closed to make room for another pool's. Under the lock."""
		self.stats.evictions["budget"] += 1
		self.stats.closed["budget"] += 1
		self._budget.evictions += 1

	def _released(self, n: int = 1) -> None:
		"""n connections (or reserved slots) are gone: their budget slots serve the queue. Under the lock."""
		self._budget.open -= n
		self._budget.dispatch()

	def _reserve(self) -> bool:
		"""Count a slot reserved to open a connection in (its budget slot is counted by the caller). True when
		the pool keeps db_pool_size connections already: the one opened is not kept. Under the lock."""
		over = self._kept() >= self.config.size
		self._opening += 1
		self._opening_over += over
		return over

	def _total(self) -> int:
		return len(self._idle) + len(self._in_use) + self._opening + self._returning

	def _kept(self) -> int:
		"""Connections this pool keeps, or will keep when they come back: db_pool_size bounds these, not
		those it closes on return (opened over the size, or while keeping did not pay). Under the lock."""
		closing = sum(1 for r in self._in_use.values() if r.defaults is None) + self._opening_over
		return self._total() - closing

	def _find_leaks(self) -> list[tuple[float, str | None]]:
		"""Connections checked out longer than leak_warning, each reported once. Under the lock."""
		threshold = self.config.leak_warning
		now = self._clock()
		leaks = []
		for record in self._in_use.values():
			if not record.leak_reported and now - record.checked_out_at >= threshold:
				record.leak_reported = True
				leaks.append((now - record.checked_out_at, record.checkout_stack))
		return leaks

	def _log_leaks(self, leaks: list[tuple[float, str | None]]) -> None:
		for held_for, stack in leaks:
			log.warning(
				"frappe_pgpool: a connection of %s has been checked out for %.1fs (db_pool_leak_warning=%gs); "
				"it was taken at:\n%s",
				self.name,
				held_for,
				self.config.leak_warning,
				stack or "(stack not recorded)",
			)

	# -- what the budget sees of it (budget.BudgetedPool); under the lock ---------------------

	@property
	def closed(self) -> bool:
		return self._closed

	def idle_count(self) -> int:
		return len(self._idle)

	def in_use_count(self) -> int:
		return len(self._in_use)

	def oldest_idle_returned_at(self) -> float:
		return self._idle[0].returned_at  # the idle list is in return order: oldest first

	def take_idle_for_eviction(self) -> Record:
		record = self._idle.pop(0)
		self._count_eviction()
		return record

	def grant_slot(self, waiter: Waiter, evict: Record | None) -> None:
		"""Let a queued caller of this pool open a connection (its budget slot is counted)."""
		self._budget.waiters.remove(waiter)
		waiter.over_size = self._reserve()
		waiter.may_connect = True
		waiter.evict = evict
		waiter.event.set()

	# -- life cycle -------------------------------------------------------------------------

	def reconfigure(self, config: PoolConfig) -> None:
		"""Apply new settings in place (site_config changed); no restart, nothing dropped in use."""
		with self._lock:
			lifetime_changed = config.max_lifetime != self.config.max_lifetime
			self.config = config
			if lifetime_changed:  # applies to the connections already open, not only to new ones
				for record in [*self._idle, *self._in_use.values()]:
					if record.defaults is not None:  # one not kept has no lifetime (see _open)
						record.expires_at = self._expiry(record.created_at)
			excess = max(0, self._kept() - config.size)
			stale = [(self._idle.pop(0), "shrunk") for _ in range(min(excess, len(self._idle)))]
			session = config.pgbouncer_mode == "session"
			for record in [r for r in self._idle if r.defaults is not None and r.defaults.session != session]:
				self._idle.remove(record)  # opened for the other pgBouncer mode (see _retire_reason)
				stale.append((record, "reconfigured"))
		self._close_records(stale)

	def close_idle(self, reason: str) -> int:
		"""Close every idle connection now (the process keeps nothing from here on). Returns how many."""
		with self._lock:
			stale = [(record, reason) for record in self._idle]
			self._idle.clear()
		self._close_records(stale)
		return len(stale)

	def close(self) -> None:
		"""Close idle connections now and in-use ones when they come back; fail waiters."""
		with self._lock:
			self._closed = True
			stale = [(record, "pool_closed") for record in self._idle]
			self._idle.clear()
			budget = self._budget
			for waiter in [w for w in budget.waiters if w.pool is self]:
				budget.waiters.remove(waiter)
				waiter.error = PoolClosed(f"frappe_pgpool: pool {self.name} was closed")
				waiter.event.set()
			budget.forget(self)
		self._close_records(stale)

	def close_if_empty(self) -> bool:
		"""Close the pool if it holds nothing: no connection idle, in use, being opened or taken back, and no
		waiter. The registry drops such a pool; a checkout that reaches it afterwards gets PoolClosed."""
		with self._lock:
			if self._closed or self._total() or any(w.pool is self for w in self._budget.waiters):
				return False
			self._closed = True
			self._budget.forget(self)
			return True

	def held(self) -> int:
		"""Connections held, being opened or taken back; read without the lock (a hint, for ranking)."""
		return self._total()

	def disown_all(self) -> None:
		"""In a forked child: make every inherited connection harmless, never closing it."""
		for record in [*self._idle, *self._in_use.values()]:
			disown(record.conn)
		self._idle.clear()
		self._in_use.clear()
		self._opening = 0
		self._opening_over = 0
		self._returning = 0
		self._closed = True
		# the shared budget and its lock (maybe held by a parent thread at fork time) stay behind
		self._budget = ProcessBudget(bounded=False)
		self._lock = self._budget.lock

	def _close_records(self, stale: list[tuple[Record, str]]) -> None:
		if not stale:
			return
		try:
			for record, _reason in stale:
				record.end()
		finally:  # their slots are freed even when interrupted (a connection left unclosed is collected)
			with self._lock:
				for _record, reason in stale:
					self.stats.closed[reason] += 1
				self._released(len(stale))

	# -- observation ------------------------------------------------------------------------

	def snapshot(self) -> dict[str, object]:
		"""A consistent copy of gauges and counters, for status commands and tests."""
		with self._lock:
			now = self._clock()
			records = [*self._idle, *self._in_use.values()]
			waits = sorted(self.stats.recent_waits)
			return {
				"name": self.name,
				"pid": self.pid,
				"max_size": self.config.size,
				"size": self._total(),
				"idle": len(self._idle),
				"in_use": len(self._in_use),
				"opening": self._opening,
				"waiting": sum(1 for w in self._budget.waiters if w.pool is self),
				"checkouts": self.stats.checkouts,
				"hits": self.stats.hits,
				"misses": self.stats.misses,
				"over_size": self.stats.over_size,
				"evictions": dict(self.stats.evictions),
				"budget_waits": self.stats.budget_waits,
				"budget_timeouts": self.stats.budget_timeouts,
				"returns": self.stats.returns,
				"created": self.stats.created,
				"closed": dict(self.stats.closed),
				"connect_errors": self.stats.connect_errors,
				"timeouts": self.stats.timeouts,
				"waits": self.stats.waits,
				"wait_seconds_total": self.stats.wait_seconds_total,
				"wait_seconds_max": self.stats.wait_seconds_max,
				"wait_seconds_p50": _percentile(waits, 0.50),
				"wait_seconds_p95": _percentile(waits, 0.95),
				"wait_seconds_p99": _percentile(waits, 0.99),
				"oldest_connection_seconds": max((now - r.created_at for r in records), default=0.0),
				"reuse_rate": self.reuse.rate(),
				"keeping": self._budget.reuse_pays(self),
			}


def _stale_reason(record: Record, now: float) -> str | None:
	"""Why an idle record must not be handed out (past its lifetime, or closed by the server)."""
	if now >= record.expires_at:
		return "lifetime"
	if not is_usable(record.conn, record.poller):
		return "dead"
	return None


def _percentile(sorted_values: list[float], q: float) -> float:
	if not sorted_values:
		return 0.0
	return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
