"""The per-process connection budget, shared by every pool of a registry (all sites and identities).

No Frappe import. It bounds the connections a process keeps open across its pools ("auto": plain
Frappe's peak of concurrent checkouts; a number; or a client budget for pools behind a pgBouncer in
transaction mode), queues the callers waiting for a slot in arrival order, picks the idle connection to
evict when a slot must be made, and decides whether keeping connections pays (the reuse gate). Its one
lock is every pool's lock. The rationale and the measurements behind it are in docs/budget.md.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

from .record import Record

# The reuse gate: while too few checkouts would have hit a kept connection, returned connections are
# closed as plain Frappe closes them. The rules and the measurements behind these figures: docs/budget.md.
REUSE_WINDOW = 64  # the process's last checkouts its rate is taken over
REUSE_MIN_RATE = 0.25  # the would-hit rate below which keeping does not pay
REUSE_MIN_RATE_ONE_SLOT = 0.4  # ... where each request's connections are all there is to keep (a sync worker)
REUSE_MARGIN = 0.5  # standard deviations a window's hits must be above that rate: a window is a sample
POOL_REUSE_WINDOW = 16  # a pool's own last checkouts
POOL_EVIDENCE = 8  # outcomes of its own a pool decides on; a quieter pool follows the process


class HitWindow:
	"""Would-hit outcomes of the last checkouts (a process's, or one pool's), their hits counted in step."""

	__slots__ = ("hits", "outcomes")

	def __init__(self, size: int) -> None:
		self.outcomes: deque[bool] = deque(maxlen=size)
		self.hits = 0

	def __len__(self) -> int:
		return len(self.outcomes)

	def add(self, hit: bool) -> None:
		if len(self.outcomes) == self.outcomes.maxlen:
			self.hits -= self.outcomes[0]
		self.outcomes.append(hit)
		self.hits += hit

	def clear(self) -> None:
		self.outcomes.clear()
		self.hits = 0

	def pays(self, min_rate: float) -> bool:
		n = len(self.outcomes)
		if n < POOL_EVIDENCE:  # a process's first checkouts: decided at once (see REUSE_MIN_RATE)
			return self.hits >= min_rate * n
		noise = math.sqrt(max(0.0, n * min_rate * (1 - min_rate)))  # 0 for the rates 0 and >= 1
		return self.hits >= min_rate * n + REUSE_MARGIN * noise

	def rate(self) -> float | None:
		return round(self.hits / len(self.outcomes), 3) if self.outcomes else None


class BudgetedPool(Protocol):
	"""What the budget sees of each pool that shares it (ConnectionPool is one), and all it does to one: it
	imports no pool. Read and called under the budget's lock, which is the pool's lock too."""

	@property
	def reuse(self) -> HitWindow:
		"""Would-hit outcomes of the pool's own last checkouts (its own reuse gate), kept by the budget."""
		...

	@property
	def closed(self) -> bool:
		"""Whether the pool was closed: it serves no more checkouts, and the budget has forgotten it."""
		...

	def idle_count(self) -> int:
		"""Its connections idle, ready to be handed out."""
		...

	def in_use_count(self) -> int:
		"""Its connections checked out."""
		...

	def oldest_idle_returned_at(self) -> float:
		"""When its oldest idle connection (the one an eviction takes) was returned. Only while one is idle."""
		...

	def take_idle_for_eviction(self) -> Record:
		"""Take its oldest idle connection out, counted as evicted (reason "budget"); whoever gets it closes it,
		outside the lock, before its slot is used again."""
		...

	def grant_slot(self, waiter: Waiter, evict: Record | None) -> None:
		"""Let a queued caller of this pool open a connection, in a budget slot already counted in `open`: a
		fresh one, or that of `evict`, the idle connection evicted for it, which it closes before connecting."""
		...


@dataclass(eq=False)
class Waiter:
	"""A caller queued for a slot of the budget (blocked in its pool's getconn), served in arrival order
	across the pools, by hand-off: a connection of its pool (record), or a slot to open one in."""

	pool: BudgetedPool
	event: threading.Event = field(default_factory=threading.Event)
	record: Record | None = None
	may_connect: bool = False
	evict: Record | None = None  # with may_connect: an evicted idle connection it closes before connecting
	over_size: bool = False  # with may_connect: its pool keeps db_pool_size already, so it opens one not kept
	error: BaseException | None = None
	# Set under the pool lock when the caller took what it was given, or gave up (then whatever a
	# waker hands it afterwards goes to the next caller): a waiter knows whether it gave up.
	done: bool = False


class ProcessBudget:
	def __init__(self, setting: int | None = None, bounded: bool = True, floor: int = 0) -> None:
		self.lock = threading.Lock()
		self.setting = setting  # None: auto; else the most connections the process keeps open
		self.floor = floor  # under auto, kept up to max(peak, floor): a client budget (docs/budget.md)
		self.bounded = bounded  # False for a pool on its own (no registry): only its db_pool_size applies
		self.pools: list[BudgetedPool] = []  # open pools sharing this budget
		self.waiters: deque[Waiter] = deque()  # callers of every pool, in arrival order
		# gauges
		self.open = 0  # connections open, being opened or being closed (counted until the close is done)
		self.active = 0  # checkouts running: from the start of getconn to the end of putconn
		self.peak = 0  # high-water mark of active
		self.holders: dict[int, int] = {}  # thread ident -> its checkouts running
		self.thread_peak = 0  # high-water mark of threads holding checkouts at once (requests in flight)
		# counters
		self.evictions = 0
		self.waits = 0  # callers that had to wait for the budget
		self.timeouts = 0  # ... and gave up after db_pool_timeout
		# checkouts let over a numeric budget because their thread already held one: it would have
		# waited for a connection only it can give back (a request holding the primary opening a replica)
		self.overdrafts = 0
		# the reuse gate (see REUSE_MIN_RATE)
		self.recent = HitWindow(REUSE_WINDOW)  # would-hit of the process's last checkouts
		self.returned: deque[BudgetedPool] = deque()  # pools that returned last, newest last
		self.used: deque[BudgetedPool] = deque(maxlen=REUSE_WINDOW)  # pools of the last checkouts
		self.uses: Counter[BudgetedPool] = Counter()  # how often each pool is in `used`
		# pools that ever returned a connection, kept or not (a client budget counts their checkouts only)
		self.returned_once: weakref.WeakSet[BudgetedPool] = weakref.WeakSet()
		self.not_reused = 0  # connections closed on return because keeping did not pay
		self.keeping = True  # False: the process keeps nothing (PoolRegistry.keep_nothing)

	# All methods below run under self.lock.

	def forget_reuse(self) -> None:
		"""Drop the reuse gate's evidence: what it measured under another rule (a client budget switched
		on again) says nothing of this one's."""
		self.recent.clear()
		self.returned.clear()
		self.used.clear()
		self.uses.clear()

	def join(self, pool: BudgetedPool) -> None:
		"""A new pool shares this budget (until forget)."""
		self.pools.append(pool)

	def limit(self) -> int | None:
		"""How many connections the process may keep open now; None: no process-wide limit."""
		if not self.bounded:
			return None
		return max(self.peak, self.floor) if self.setting is None else self.setting

	def checkout_started(self, thread: int) -> bool:
		"""Count a checkout of `thread`; True if that thread already holds one (a nested checkout)."""
		self.active += 1
		if self.active > self.peak:
			self.peak = self.active
		held = self.holders.get(thread, 0)
		self.holders[thread] = held + 1
		if len(self.holders) > self.thread_peak:
			self.thread_peak = len(self.holders)
		return held > 0

	def checkout_ended(self, thread: int) -> None:
		self.active -= 1
		held = self.holders.get(thread, 0) - 1
		if held > 0:
			self.holders[thread] = held
		else:
			self.holders.pop(thread, None)

	def note_checkout(self, pool: BudgetedPool) -> None:
		if len(self.used) == self.used.maxlen:
			oldest = self.used[0]
			self.uses[oldest] -= 1
			if not self.uses[oldest]:
				del self.uses[oldest]
		if pool not in self.uses and pool.reuse.hits:
			# busy once, not seen for REUSE_WINDOW checkouts: its hits are stale (its misses are not: a
			# site seldom served keeps counting them, or it would follow a busy process into kept misses)
			pool.reuse.clear()
		self.used.append(pool)
		self.uses[pool] += 1
		if not self.returned:
			return  # nothing was returned yet: no checkout could have hit, so none says anything
		if (self.floor or self.setting is not None) and pool not in self.returned_once:
			# A numeric budget is connections the operator wants kept (a worker's --process-budget N for its N
			# sites), a client budget has room for a client per site: there a pool's checkouts before it ever
			# returned one (kept or closed) could not hit whatever was kept, so they say nothing (else a
			# worker's first round over its sites, each a miss, shuts the gate and each site logs in again
			# before it is kept: 77 logins for 2 workers x 20 sites where keeping from the start makes 40; a
			# bench's first round over 20 sites would shut the gate it opens in the second). Under auto a sync
			# worker's spread traffic still stops keeping at its second checkout.
			return
		# Idle now, under the budget: its limit less the other checkouts running (a gthread worker's
		# threads, or this request's primary when it opens a replica, hold theirs), so only that many of
		# the pools that returned last could serve this one, not counting those busy again with nothing idle.
		# A pool absent from them is a miss at once, with no pass over the others (most checkouts of
		# spread traffic).
		if pool in self.returned:
			room = max(1, (self.limit() or 1) - (self.active - 1))
			candidates = (
				p for p in reversed(self.returned) if p is pool or p.idle_count() or not p.in_use_count()
			)
			would_hit = pool in islice(candidates, room)
		else:
			would_hit = False
		self.recent.add(would_hit)
		pool.reuse.add(would_hit)

	def note_return(self, pool: BudgetedPool) -> None:
		if pool.closed:  # forgotten at close(): a connection it had out coming back does not revive it
			return
		self.returned_once.add(pool)
		if pool in self.returned:
			self.returned.remove(pool)
		self.returned.append(pool)
		while len(self.returned) > max(1, self.limit() or 1):
			self.returned.popleft()

	def reuse_pays(self, pool: BudgetedPool | None = None) -> bool:
		"""Whether connections (of `pool`, else of the process) are worth keeping now (see REUSE_MIN_RATE)."""
		if not self.keeping:
			return False
		if not self.bounded or not self.recent:
			return True
		min_rate = self.reuse_min_rate()
		if pool is not None and len(pool.reuse) >= POOL_EVIDENCE:
			return pool.reuse.pays(min_rate)
		return self.recent.pays(min_rate)

	def reuse_min_rate(self) -> float:
		"""The would-hit rate below which returned connections are closed: higher where each request's
		connections are all there is to keep (one request at a time under auto, or a budget of 1)."""
		one_slot = self.limit() == 1 or (self.setting is None and self.floor <= 1 and self.thread_peak <= 1)
		return REUSE_MIN_RATE_ONE_SLOT if one_slot else REUSE_MIN_RATE

	def has_room(self) -> bool:
		limit = self.limit()
		return limit is None or self.open < limit

	def over_limit(self) -> bool:
		limit = self.limit()
		return limit is not None and self.open > limit

	def pool_to_evict_from(self, exclude: BudgetedPool | None = None) -> BudgetedPool | None:
		"""The pool, other than `exclude`, whose oldest idle connection is the one to evict: a spare (its pool
		has a newer one idle), else that of the pool least used lately; among equals the least recently returned."""
		best = None
		best_rank: tuple[int, float] | None = None
		for pool in self.pools:
			if pool is exclude or not pool.idle_count():
				continue
			# a spare (its pool has a newer one idle, which LIFO hands out first) is as cold as it gets
			uses = 0 if pool.idle_count() > 1 else self.uses.get(pool, 0)
			rank = (uses, pool.oldest_idle_returned_at())
			if best_rank is None or rank < best_rank:
				best, best_rank = pool, rank
		return best

	def forget(self, pool: BudgetedPool) -> None:
		"""A closed pool: no longer among the pools nor in the usage counts (they hold no closed pool)."""
		if pool in self.pools:
			self.pools.remove(pool)
		if pool in self.returned:
			self.returned.remove(pool)
		if pool in self.uses:
			self.used = deque((p for p in self.used if p is not pool), maxlen=REUSE_WINDOW)
			del self.uses[pool]

	def dispatch(self) -> None:
		"""Serve queued callers, in arrival order, with the slots free now.

		Callers wait only for the budget: a pool's db_pool_size bounds what it keeps, not what it opens (one
		opened over it is not kept). A caller gets a fresh slot if there is room, else the coldest idle
		connection of another pool (pool_to_evict_from) is evicted for it. Idle connections of a caller's own
		pool are never left for this: a returned connection goes to the first waiter, of its pool or not (the
		pool's check-in).
		"""
		for waiter in list(self.waiters):
			pool = waiter.pool
			if self.has_room():
				self.open += 1
				pool.grant_slot(waiter, None)
				continue
			victim = self.pool_to_evict_from(exclude=pool)
			if victim is None:
				return  # the budget is used up and nothing is idle: the callers behind wait too
			# the victim's slot: the waiter closes it before connecting
			pool.grant_slot(waiter, victim.take_idle_for_eviction())

	def trim(self) -> list[tuple[BudgetedPool, Record]]:
		"""Idle connections above the limit (it was lowered), coldest first (see pool_to_evict_from), to close."""
		excess: list[tuple[BudgetedPool, Record]] = []
		limit = self.limit()
		while limit is not None and self.open - len(excess) > limit:
			victim = self.pool_to_evict_from()
			if victim is None:
				break
			excess.append((victim, victim.take_idle_for_eviction()))
		return excess

	def snapshot(self) -> dict[str, object]:
		pools = list(self.pools)
		return {
			"process_budget": "auto" if self.setting is None else self.setting,
			**({"process_clients": self.floor} if self.floor else {}),
			"limit": self.limit(),
			"open": self.open,
			"in_use": sum(p.in_use_count() for p in pools),
			"idle": sum(p.idle_count() for p in pools),
			"active": self.active,
			"peak": self.peak,
			"waiting": len(self.waiters),
			"pools": len(pools),
			"evictions": self.evictions,
			"budget_waits": self.waits,
			"budget_timeouts": self.timeouts,
			"budget_overdrafts": self.overdrafts,
			"reuse_rate": self.recent.rate(),
			"reuse_min_rate": self.reuse_min_rate() if self.bounded else None,
			"keeping": self.reuse_pays(),
			"not_reused": self.not_reused,
		}
