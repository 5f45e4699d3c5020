"""The per-process registry of pools, keyed by the full connection identity.

No Frappe import. A connection opened for one key is only ever handed out for that key,
and a process created by fork() starts with no pools: what it inherited is disowned.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg2.extensions as ext

from .budget import ProcessBudget
from .config import PROCESS_CLIENTS_OFF, PoolConfig, parse_process_budget, parse_process_clients
from .errors import ConfigError, PoolClosed
from .pool import Connect, ConnectionPool

log = logging.getLogger("frappe_pgpool")

_KEEP = object()  # getconn without process_budget: keep the current one

# A pool that holds nothing and has had no checkout for this long, or for its max_idle if longer, is dropped
# (maintain): every site and every password rotation would otherwise add a pool to the process for good.
UNUSED_POOL_SECONDS = 60.0

# The counters of a pool snapshot (ConnectionPool.snapshot), which a dropped pool leaves in the process totals
COUNTERS = (
	"checkouts",
	"hits",
	"misses",
	"returns",
	"created",
	"connect_errors",
	"timeouts",
	"waits",
	"wait_seconds_total",
	"budget_waits",
	"budget_timeouts",
)
COUNTERS_BY_REASON = ("closed", "evictions")
# The figures of a budget snapshot that add up over a process's two budgets (PoolRegistry.snapshot)
TOTALS = (
	"open",
	"in_use",
	"idle",
	"active",
	"waiting",
	"pools",
	"evictions",
	"budget_waits",
	"budget_timeouts",
	"budget_overdrafts",
	"not_reused",
)


def add_counters(total: dict, snapshot: dict) -> dict:
	"""Add a pool snapshot's counters to `total` (in place): sums, per-reason sums, the longest wait."""
	for name in COUNTERS:
		total[name] = total.get(name, 0) + snapshot.get(name, 0)
	for name in COUNTERS_BY_REASON:
		merged = total.setdefault(name, {})
		for reason, count in (snapshot.get(name) or {}).items():
			merged[reason] = merged.get(reason, 0) + count
	total["wait_seconds_max"] = max(total.get("wait_seconds_max", 0.0), snapshot.get("wait_seconds_max", 0.0))
	return total


@dataclass(frozen=True)
class PoolKey:
	"""Everything that decides which server session a connection is: site and credentials."""

	site: str
	host: str
	port: str
	dbname: str
	user: str
	password_digest: str = field(repr=False)

	@classmethod
	def make(
		cls, site: str, host: str | None, port: object, dbname: str, user: str, password: str | None
	) -> PoolKey:
		# The password takes part in the identity (a changed password must not reuse sessions
		# logged in with the old one) but only as a digest, never in clear in memory or output.
		digest = hashlib.sha256(f"{user}\0{password or ''}".encode()).hexdigest()
		return cls(site, host or "", "" if port is None else str(port), dbname, user, digest)

	@property
	def label(self) -> str:
		where = f"{self.host}:{self.port}" if self.port else self.host or "default socket"
		return f"site {self.site} ({self.user}@{where}/{self.dbname})"


def _end_excess(budget: ProcessBudget, excess: list) -> None:
	"""Close the idle connections a lowered budget took out (trim), outside its lock; their slots are
	freed even when interrupted."""
	try:
		for _pool, record in excess:
			record.end()
	finally:
		if excess:
			with budget.lock:
				budget.open -= len(excess)
				budget.dispatch()


class PoolRegistry:
	"""The pools of one process, and the connection budgets they share (see budget.py).

	Two budgets: every pool shares db_pool_process_budget, whose "auto" keeps no more than plain Frappe's
	peak, but when db_pool_process_clients is set (opt-in), pools whose config says pgBouncer runs them in
	transaction mode share that client budget instead (a kept connection there is a pgBouncer client, not
	a server). A pool whose budget changes (its mode, or the client budget switched on or off) is closed
	and made again under the other budget.

	Lock order: self._lock (the pool dict, the reaper) may be held while taking the budget's lock, which
	is also every pool's lock; never the reverse. Finalizers take neither (see abandon).
	"""

	def __init__(self, reap_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
		self._lock = threading.Lock()
		self._clock = clock  # its pools' clock too
		self._budget = ProcessBudget()  # "auto" until set_process_budget says otherwise
		# transaction-mode pools' budget once db_pool_process_clients sets its floor (0: off)
		self._clients = ProcessBudget(floor=PROCESS_CLIENTS_OFF)
		self._clients_value: object = None  # the db_pool_process_clients value last given, as given
		self._budget_value: object = None  # the db_pool_process_budget value last given, as given
		self._budget_pinned = False  # pin_process_budget: the configured value no longer applies here
		self._bad_budgets: set[str] = set()  # invalid values already logged
		self._pools: dict[PoolKey, ConnectionPool] = {}
		self._sites: set[str] = set()  # sites with a pool here (holds_site); their pools go all together
		self._owner: dict[int, ConnectionPool] = {}  # id(conn) -> pool, for checked-out connections
		# key -> (its pool's checkouts when last seen changed, the clock then): when it was last used (maintain)
		self._activity: dict[PoolKey, tuple[int, float]] = {}
		self._dropped: dict[str, object] = {"pools": 0}  # the counters of the pools dropped (add_counters)
		self._dropped_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()  # checkouts retry on these
		# Connections given up by a finalizer (see abandon), discarded at the next checkout, return or reaper round.
		self._abandoned: deque[ext.connection] = deque()
		self._pid = os.getpid()
		self.reap_interval = reap_interval  # 0: no reaper thread, idle connections pruned on use only
		self._reaper: _Reaper | None = None
		# called after each reaper round (the Frappe layer publishes stats from here)
		self.listeners: list[Callable[[], None]] = []
		_registries.add(self)

	def getconn(
		self,
		key: PoolKey,
		config: PoolConfig,
		connect: Connect,
		process_budget: object = _KEEP,
		process_clients: object = _KEEP,
	) -> ext.connection:
		"""A connection for key; process_budget and process_clients are db_pool_process_budget and
		db_pool_process_clients as configured (raw), if given."""
		if self._abandoned:
			self._drain_abandoned()
		if process_budget is not _KEEP and process_budget != self._budget_value and not self._budget_pinned:
			self.set_process_budget(process_budget)
		if process_clients is not _KEEP and process_clients != self._clients_value:
			self.set_process_clients(process_clients)
		pool = self.pool(key, config)
		while True:
			try:
				conn = pool.getconn(connect)
				break
			except PoolClosed:
				if pool not in self._dropped_pools:
					raise
				pool = self.pool(key, config)  # dropped since it was looked up (maintain): a fresh one
		# No lock: a dict item set/pop is atomic, and an id cannot be reused while the pool
		# holds the connection, so id(conn) names exactly this connection.
		self._owner[id(conn)] = pool
		return conn

	def putconn(self, conn: ext.connection, discard: bool = False) -> bool:
		"""Return a pooled connection; False if it is not one of ours (caller closes it as usual)."""
		if self._abandoned:
			self._drain_abandoned()
		pool = self._owner.pop(id(conn), None)
		if pool is None:
			return False
		return pool.putconn(conn, discard)

	def owns(self, conn: ext.connection) -> bool:
		pool = self._owner.get(id(conn))
		return pool is not None and pool.owns(conn)

	def mark(self, conn: ext.connection, reason: str) -> None:
		"""Close a checked-out connection on return instead of resetting it (see ConnectionPool.mark)."""
		pool = self._owner.get(id(conn))
		if pool is not None:
			pool.mark(conn, reason)

	def keep_nothing(self) -> None:
		"""This process will serve no further checkout worth keeping a connection for (an RQ work-horse runs
		one job, then leaves by os._exit, with no atexit): from here on its connections are opened and closed
		as plain Frappe's (no rollback, no reset on return: closed inside the request's transaction, so
		pgBouncer drops the server), and what is idle is ended now. A forked child starts keeping again."""
		self._check_pid()
		for budget in (self._budget, self._clients):
			with budget.lock:
				budget.keeping = False
		for pool in self.pools().values():
			pool.close_idle("keep_nothing")

	def abandon(self, conn: ext.connection) -> None:
		"""Discard a checked-out connection later: safe from a finalizer or __del__, wherever it runs.

		The cyclic garbage collector runs finalizers inside whatever allocation triggers it, which can
		be one made while this very thread holds a pool's lock (non-reentrant): taking any lock here
		could deadlock. So this only appends to a deque (atomic); the connection is discarded at the
		next checkout, return or reaper round, by a caller that holds no lock.
		"""
		self._abandoned.append(conn)

	def _drain_abandoned(self) -> None:
		while True:
			try:
				conn = self._abandoned.popleft()
			except IndexError:
				return
			pool = self._owner.pop(id(conn), None)
			if pool is not None:
				pool.putconn(conn, discard=True)

	def set_process_budget(self, value: object) -> None:
		"""Apply db_pool_process_budget ("auto", None or 1..1000). A bad value is logged once, naming the
		key, and "auto" applies (never more connections than plain Frappe) until it is fixed."""
		self._check_pid()
		setting = self._parse_or_auto(parse_process_budget, value, None)
		self._budget_value = value
		budget = self._budget
		with budget.lock:
			if setting == budget.setting:
				return
			budget.setting = setting
			excess = budget.trim()  # a lower budget: idle connections above it are closed now
			budget.dispatch()  # a higher one: waiters get its new slots
		_end_excess(budget, excess)

	def pin_process_budget(self, value: object) -> None:
		"""Apply `value` as this process's db_pool_process_budget for good: the configured one, which getconn
		applies whenever it changes, is ignored from now on (a worker started with --process-budget). A bad
		value raises ConfigError: the caller chose it, nothing falls back to auto behind its back."""
		parse_process_budget(value)
		self.set_process_budget(value)
		self._budget_pinned = True

	def set_process_clients(self, value: object) -> None:
		"""Apply db_pool_process_clients ("auto" or None: off, or 1..1000) to the transaction-mode pools'
		budget. A bad value is logged once, naming the key, and "auto" applies until it is fixed."""
		self._check_pid()
		floor = self._parse_or_auto(parse_process_clients, value, PROCESS_CLIENTS_OFF)
		self._clients_value = value
		budget = self._clients
		with budget.lock:
			if floor == budget.floor:
				return
			if not budget.floor:
				budget.forget_reuse()  # switched on: what the gate saw before (another rule) says nothing now
			budget.floor = floor
			# switched off: its pools move to db_pool_process_budget at their next checkout (pool()), and
			# what they keep idle is closed now (below), as the peak rule would not have kept it
			switched_off = list(budget.pools) if floor == PROCESS_CLIENTS_OFF else []
			excess = [] if switched_off else budget.trim()  # lowered: idle clients above it are closed now
			budget.dispatch()
		for pool in switched_off:
			pool.close_idle("reconfigured")
		_end_excess(budget, excess)

	def _parse_or_auto(self, parse: Callable[[object], object], value: object, auto: object) -> object:
		"""A process-wide key's value as parsed; a bad one is logged once, naming the key, and `auto`
		(what "auto" parses to) applies until it is fixed."""
		try:
			return parse(value)
		except ConfigError as e:
			if repr(value) not in self._bad_budgets:
				self._bad_budgets.add(repr(value))
				log.error("%s; this process uses auto until it is fixed", e)
			return auto

	def snapshot(self) -> dict[str, object]:
		"""The process-wide figures: budget setting, limit and peak (db_pool_process_budget's), connections
		open, in use, idle, checkouts, evictions of the whole process; with transaction-mode pools, their
		client budget's own figures under "clients" (its connections are in the totals too)."""
		self._check_pid()
		with self._budget.lock:
			snapshot = self._budget.snapshot()
		with self._clients.lock:
			if not (self._clients.pools or self._clients.open or self._clients.evictions):
				return snapshot
			clients = self._clients.snapshot()
		for name in TOTALS:
			snapshot[name] += clients[name]
		snapshot["clients"] = clients
		return snapshot

	def budget_of(self, config: PoolConfig) -> ProcessBudget:
		"""The budget a pool with this config shares: the client budget behind a transaction pooler, when
		db_pool_process_clients switched it on."""
		if config.pgbouncer_mode == "transaction" and self._clients.floor != PROCESS_CLIENTS_OFF:
			return self._clients
		return self._budget

	def pool(self, key: PoolKey, config: PoolConfig) -> ConnectionPool:
		self._check_pid()
		pool = self._pools.get(key)
		budget = self.budget_of(config)
		if pool is None or pool._budget is not budget:
			replaced = None
			with self._lock:
				pool = self._pools.get(key)
				if pool is not None and pool._budget is not budget:
					# db_pool_pgbouncer_mode changed: the pool goes (its connections in use close on return,
					# a checkout that finds it closed retries) and a fresh one is made under the right budget
					replaced = pool
					self._dropped_pools.add(replaced)
					del self._pools[key]
					pool = None
				if pool is None:
					pool = ConnectionPool(key.label, config, clock=self._clock, budget=budget)
					self._pools[key] = pool
					self._activity[key] = (0, self._clock())
					self._sites.add(key.site)
					self._ensure_reaper()
			if replaced is not None:
				replaced.close()
				with self._lock:
					add_counters(self._dropped, replaced.snapshot())
					self._dropped["pools"] += 1
		if pool.config is not config and pool.config != config:
			pool.reconfigure(config)
		return pool

	def pools(self) -> dict[PoolKey, ConnectionPool]:
		self._check_pid()
		return dict(self._pools)

	def dropped(self) -> dict[str, object]:
		"""The counters of the pools dropped so far ("pools": how many), as a pool snapshot has them."""
		return self.census()[1]

	def census(self) -> tuple[dict[PoolKey, ConnectionPool], dict[str, object]]:
		"""pools() and dropped() at one instant: a pool is in one or the other, never both, never neither."""
		self._check_pid()
		with self._lock:
			dropped = {k: dict(v) if isinstance(v, dict) else v for k, v in self._dropped.items()}
			return dict(self._pools), dropped

	def holds_site(self, site: str) -> bool:
		"""Whether this process has a pool of `site` (O(1): asked at every connection of a site that does not pool)."""
		self._check_pid()
		return site in self._sites

	def close_site(self, site: str) -> int:
		"""Close the pools of a site (pooling switched off); in-use connections close on return."""
		with self._lock:
			keys = [key for key in self._pools if key.site == site]
			pools = [self._pools.pop(key) for key in keys]
			for key in keys:
				self._activity.pop(key, None)
			self._sites.discard(site)
		for pool in pools:
			pool.close()
		return len(pools)

	def maintain(self) -> int:
		"""Prune every pool's stale idle connections, then drop the pools unused and empty (the reaper does
		this every reap_interval). Returns how many connections were closed."""
		if self._abandoned:
			self._drain_abandoned()
		closed = sum(pool.maintain() for pool in self.pools().values())
		self._drop_unused()
		return closed

	def _drop_unused(self) -> None:
		"""Close and forget the pools that hold nothing and have had no checkout for their max_idle, at least
		UNUSED_POOL_SECONDS; their counters go to dropped(). A later checkout of the key makes a fresh pool.
		One pass over the pools, a few attribute reads each."""
		now = self._clock()
		with self._lock:
			activity = self._activity
			drop = []
			for key, pool in self._pools.items():
				checkouts = pool.stats.checkouts
				seen = activity.get(key)
				if seen is None or seen[0] != checkouts:
					activity[key] = (checkouts, now)
				elif now - seen[1] >= max(pool.config.max_idle, UNUSED_POOL_SECONDS) and not pool.held():
					drop.append(key)
			if not drop:
				return
			for key in drop:
				pool = self._pools[key]
				# first: a checkout that finds it closed must know at once that it was dropped (and retry)
				self._dropped_pools.add(pool)
				if not pool.close_if_empty():  # under the budget's lock: a checkout may have begun meanwhile
					self._dropped_pools.discard(pool)
					continue
				del self._pools[key]
				del activity[key]
				add_counters(self._dropped, pool.snapshot())
				self._dropped["pools"] += 1
			self._sites = {key.site for key in self._pools}

	def _ensure_reaper(self) -> None:
		# Under self._lock. Threads do not survive fork(): a child starts its own on first use.
		if self.reap_interval and (self._reaper is None or not self._reaper.is_alive()):
			self._reaper = _Reaper(self, self.reap_interval)
			self._reaper.start()

	def close_all(self) -> None:
		with self._lock:
			pools = list(self._pools.values())
			self._pools.clear()
			self._sites.clear()
			self._activity.clear()
			if self._reaper is not None:
				self._reaper.stop.set()
				self._reaper = None
		for pool in pools:
			pool.close()

	def after_fork_in_child(self) -> None:
		"""Runs in the child right after fork(): forget the parent's pools without a Terminate, those it
		dropped or closed too while a checkout of theirs is still out."""
		for pool in {*self._pools.values(), *self._dropped_pools, *self._owner.values()}:
			pool.disown_all()
		self._pools = {}
		self._sites = set()
		self._activity = {}
		self._dropped = {"pools": 0}  # the child's counters start at none, as its budget's
		self._dropped_pools = weakref.WeakSet()
		# a fresh budget: its lock may have been held at fork time; the child's checkouts start at none
		self._budget = ProcessBudget(setting=self._budget.setting)
		self._clients = ProcessBudget(floor=self._clients.floor)
		self._owner = {}
		self._abandoned = deque()  # the parent's connections, disowned above
		self._lock = threading.Lock()  # may have been held by a parent thread at fork time
		self._reaper = None  # the parent's thread does not exist here
		self._pid = os.getpid()

	def _check_pid(self) -> None:
		# register_at_fork covers os.fork(); this catches forks it does not see.
		if self._pid != os.getpid():
			self.after_fork_in_child()


class _Reaper(threading.Thread):
	"""Daemon thread that prunes idle connections while the process gets no traffic.

	Holds only a weak reference, so a dropped registry ends its thread.
	"""

	def __init__(self, reg: PoolRegistry, interval: float) -> None:
		super().__init__(name="frappe_pgpool-reaper", daemon=True)
		self.registry = weakref.ref(reg)
		self.interval = interval
		self.pid = os.getpid()
		self.stop = threading.Event()

	def run(self) -> None:
		while not self.stop.wait(self.interval):
			reg = self.registry()
			if reg is None or reg._pid != self.pid or reg._reaper is not self:
				return
			for task in (reg.maintain, *reg.listeners):
				try:
					task()
				except Exception:  # never let the thread die on a surprise; the next round retries
					log.exception("frappe_pgpool: reaper round failed")
			del reg


def _after_fork_in_child() -> None:
	for reg in list(_registries):
		reg.after_fork_in_child()


def _close_at_exit() -> None:
	# Kept connections end as plain Frappe's (ConnectionPool.close -> Record.end): pgBouncer drops their
	# servers; a process that exits without this (os._exit) keeps nothing (PoolRegistry.keep_nothing).
	for reg in list(_registries):
		if reg._pid == os.getpid():
			reg.close_all()


_registries: weakref.WeakSet[PoolRegistry] = weakref.WeakSet()
os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)
registry = PoolRegistry()
