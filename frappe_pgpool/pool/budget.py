"""The per-process connection budget, shared by every pool of a registry (all sites and identities).

No Frappe import. One process (a sync worker, a gthread worker, an RQ worker) serves many sites; a pool
per site that keeps its connections would hold one per site served, and behind pgBouncer in session mode
each of them pins a server connection. The budget bounds what the process keeps open across all its
pools:

- "auto" (setting None): no more than the high-water mark of the process's concurrent checkouts, which is
  what plain Frappe (one connection per running request or job) would have had open at its peak. A
  checkout never waits for it: when every open connection is in use the peak grows by one, exactly as
  plain Frappe would open another connection.
- a number N: at most N connections; when all N are in use, callers wait in arrival order, across pools.
- a client budget (`floor`, the registry's budget for pools behind a pgBouncer in transaction mode,
  db_pool_process_clients): auto with a floor, max(peak, floor). There a kept connection is a pgBouncer
  client (a few KiB there), not a server: pgBouncer lends a server for one transaction at a time, so
  keeping a client per site costs no server while it is idle, and the peak rule would only ration clients
  as if they were servers. A checkout never waits for it either (the peak grows as under auto).

When a connection must be opened and the budget is used up, an idle connection of another pool is closed
to make room (an eviction, reason "budget"); one in use never is. The one closed is a spare (a pool's older
idle connection, which LIFO would hand out last), else that of the pool least used over the last
REUSE_WINDOW checkouts, the least recently returned among equals: under skewed traffic
the busiest sites keep their connections (simulated, Zipf s=1.1 over 20 sites, 4 kept: 57% of checkouts
hit, against 45% when the least recently used one goes).

Locking: one lock (`ProcessBudget.lock`) is shared by all the pools of a registry and is every pool's
`_lock`, so slots, idle lists, the waiter queue and the budget's counters change together and an
eviction across pools needs no second lock. The registry's own lock (its pool dict) may be held while
taking it, never the reverse. Nothing slow runs under it: no connect, reset, close or logging. Garbage
collector callbacks (finalizers) take no lock at all (see PoolRegistry.abandon).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from itertools import islice
from typing import TYPE_CHECKING

if TYPE_CHECKING:
	from .pool import ConnectionPool, _Record, _Waiter

# Keeping a connection pays only if it is used again: each miss then costs the return's rollback and
# reset, and an eviction, on top of the login plain Frappe pays anyway. A checkout "would hit" when its
# pool was among the last pools to return a connection, as many as could be idle then: the limit less the
# other checkouts running (what keeping them would have served, were the least recently used evicted;
# evicting the least used instead hit more often in benchmarks/eviction.py).
# Over the last REUSE_WINDOW checkouts, below REUSE_MIN_RATE, returned connections are closed as plain
# Frappe closes them (inside the request's transaction, so pgBouncer drops the server too), until the
# traffic concentrates again. Measured on 20 sites: uniform traffic over them hits 0-5% (sites.md).
# The gate opens on evidence: checkouts before the process's first return could not hit whatever was
# kept, so they are not counted, and only while nothing is counted does it keep by default. A worker
# (or a gthread worker's first burst) on one site keeps its first connections and logs in once each;
# traffic spread over many sites stops keeping at its second checkout, not after a warm-up of kept
# misses (each ~0.3 ms CPU and ~0.9 ms wall more than a closed one: benchmarks/kept_miss.py).
# The rate is also per site: with skewed traffic the process as a whole may fall below it while its
# busiest site would hit every second time, or rise above it while its quiet sites' kept connections are
# only evicted. A pool with POOL_EVIDENCE of its own last POOL_REUSE_WINDOW checkouts decides on them;
# a quieter one follows the process. A pool with hits that is absent from the process's last
# REUSE_WINDOW checkouts starts its evidence again: a site busy once does not keep on what it did then.
# A process that keeps one connection (a sync worker, or db_pool_process_budget 1) evicts it inside the
# next request for another site, so each kept miss costs a return's rollback and reset and an eviction's
# round trip on the request path: there keeping must hit more often to pay. Measured on 4 sync workers
# under Zipf traffic over 20 sites (benchmarks/miss_path.py, 8 rounds): the busiest site (31% of the
# traffic) would hit about that often; keeping it at 25% gave x0.99-1.03 req/s and p95 x1.02-1.06 (x1.05
# and x1.06 with p95 above in 7 of 8 paired rounds); with the gate forced shut (one cell), x1.00 and p95
# x1.01; at 40%, x0.99-1.03 and p95 x0.95-1.02. A sync worker whose requests open a replica while holding
# the primary has a limit of 2 but still runs one request at a time, so it too needs 40%: the rate keys on
# the threads that ever held checkouts at once, not on the limit (a numeric budget above 1 keeps several).
# A window is a sample: a site that would hit 31% of the time shows 7 of 16 (over 40%) in about one
# window of five, and 20% shows 4 of 16 (25%) in two of five; keeping on such a window only adds kept
# misses (benchmarks/miss_path.py: 2 gthread workers over 20 sites, uniform: 3.5-5.3% hits). So the
# count must be above the threshold by REUSE_MARGIN standard deviations of a binomial count at that rate:
# 8 of 16 at 40%, 5 of 16 at 25%; 28 and 18 of 64. This halves the openings by chance without removing
# them, and a site truly above the rate is kept less often (at 45%, 44% of its windows pass, not 63%).
# Not under POOL_EVIDENCE outcomes (only the process's window is that short, over its first
# checkouts): those decide at once, as above.
REUSE_WINDOW = 64
REUSE_MIN_RATE = 0.25
REUSE_MIN_RATE_ONE_SLOT = 0.4
REUSE_MARGIN = 0.5
POOL_REUSE_WINDOW = 16
POOL_EVIDENCE = 8


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


class ProcessBudget:
	def __init__(self, setting: int | None = None, bounded: bool = True, floor: int = 0) -> None:
		self.lock = threading.Lock()
		self.setting = setting  # None: auto; else the most connections the process keeps open
		self.floor = floor  # under auto, kept up to max(peak, floor): a client budget (see above)
		self.bounded = bounded  # False for a pool on its own (no registry): only its db_pool_size applies
		self.pools: list[ConnectionPool] = []  # open pools sharing this budget
		self.waiters: deque[_Waiter] = deque()  # callers of every pool, in arrival order
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
		self.returned: deque[ConnectionPool] = deque()  # pools that returned last, newest last
		self.used: deque[ConnectionPool] = deque(maxlen=REUSE_WINDOW)  # pools of the last checkouts
		self.uses: Counter[ConnectionPool] = Counter()  # how often each pool is in `used`
		self.not_reused = 0  # connections closed on return because keeping did not pay
		self.keeping = True  # False: the process keeps nothing (PoolRegistry.keep_nothing)

	# All methods below run under self.lock.

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

	def note_checkout(self, pool: ConnectionPool) -> None:
		if len(self.used) == self.used.maxlen:
			oldest = self.used[0]
			self.uses[oldest] -= 1
			if not self.uses[oldest]:
				del self.uses[oldest]
		if pool not in self.uses and pool._reuse.hits:
			# busy once, not seen for REUSE_WINDOW checkouts: its hits are stale (its misses are not: a
			# site seldom served keeps counting them, or it would follow a busy process into kept misses)
			pool._reuse.clear()
		self.used.append(pool)
		self.uses[pool] += 1
		if not self.returned:
			return  # nothing was returned yet: no checkout could have hit, so none says anything
		if self.setting is not None and not pool.stats.checkouts:
			# a numeric budget is connections the operator wants kept (a worker's --process-budget N for its N
			# sites): a pool's first checkout could not hit whatever was kept, so it says nothing either (else
			# a worker's first round over its sites, each a miss, shuts the gate, and each site logs in again
			# before it is kept: 77 logins for 2 workers x 20 sites, where keeping from the start makes 40).
			# Under auto a sync worker's spread traffic still stops keeping at its second checkout.
			return
		if self.floor and not pool.stats.returns:
			# a client budget has room for a client per site it serves: a pool's first checkouts, before it
			# ever returned one, could not hit whatever was kept, so they say nothing either (else a bench's
			# first round over 20 sites would shut the gate it opens in the second)
			return
		# Idle now, under the budget: its limit less the other checkouts running (a gthread worker's
		# threads, or this request's primary when it opens a replica, hold theirs), so only that many of
		# the pools that returned last could serve this one, not counting those busy again with nothing idle.
		# A pool absent from them is a miss at once, with no pass over the others (most checkouts of
		# spread traffic).
		if pool in self.returned:
			room = max(1, (self.limit() or 1) - (self.active - 1))
			candidates = (p for p in reversed(self.returned) if p is pool or p._idle or not p._in_use)
			would_hit = pool in islice(candidates, room)
		else:
			would_hit = False
		self.recent.add(would_hit)
		pool._reuse.add(would_hit)

	def note_return(self, pool: ConnectionPool) -> None:
		if pool._closed:  # forgotten at close(): a connection it had out coming back does not revive it
			return
		if pool in self.returned:
			self.returned.remove(pool)
		self.returned.append(pool)
		while len(self.returned) > max(1, self.limit() or 1):
			self.returned.popleft()

	def reuse_pays(self, pool: ConnectionPool | None = None) -> bool:
		"""Whether connections (of `pool`, else of the process) are worth keeping now (see REUSE_MIN_RATE)."""
		if not self.keeping:
			return False
		if not self.bounded or not self.recent:
			return True
		min_rate = self.reuse_min_rate()
		if pool is not None and len(pool._reuse) >= POOL_EVIDENCE:
			return pool._reuse.pays(min_rate)
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

	def coldest_idle(self, exclude: ConnectionPool | None = None) -> tuple[ConnectionPool, _Record] | None:
		"""The idle connection to evict, of any pool but `exclude`, with its pool: a spare (a pool's older idle
		connection), else that of the pool least used lately; among equals the least recently returned."""
		best = None
		best_rank: tuple[int, float] | None = None
		for pool in self.pools:
			if pool is exclude or not pool._idle:
				continue
			record = pool._idle[0]  # each pool's idle list is in return order: oldest first
			# a spare (its pool has a newer one idle, which LIFO hands out first) is as cold as it gets
			uses = 0 if len(pool._idle) > 1 else self.uses.get(pool, 0)
			rank = (uses, record.returned_at)
			if best_rank is None or rank < best_rank:
				best, best_rank = (pool, record), rank
		return best

	def forget(self, pool: ConnectionPool) -> None:
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
		connection of another pool (coldest_idle) is evicted for it. Idle connections of a caller's own pool
		are never left for this: a returned connection goes to the first waiter, of its pool or not (_check_in).
		"""
		for waiter in list(self.waiters):
			pool = waiter.pool
			if self.has_room():
				self.open += 1
				pool._grant_slot_to(waiter, None)
				continue
			victim = self.coldest_idle(exclude=pool)
			if victim is None:
				return  # the budget is used up and nothing is idle: the callers behind wait too
			victim_pool, record = victim
			victim_pool._idle.remove(record)
			victim_pool._count_eviction()
			pool._grant_slot_to(waiter, record)  # the victim's slot: it closes it before connecting

	def trim(self) -> list[tuple[ConnectionPool, _Record]]:
		"""Idle connections above the limit (it was lowered), coldest first (see coldest_idle), to close."""
		excess = []
		limit = self.limit()
		while limit is not None and self.open - len(excess) > limit:
			victim = self.coldest_idle()
			if victim is None:
				break
			victim_pool, record = victim
			victim_pool._idle.remove(record)
			victim_pool._count_eviction()
			excess.append(victim)
		return excess

	def snapshot(self) -> dict[str, object]:
		pools = list(self.pools)
		return {
			"process_budget": "auto" if self.setting is None else self.setting,
			**({"process_clients": self.floor} if self.floor else {}),
			"limit": self.limit(),
			"open": self.open,
			"in_use": sum(len(p._in_use) for p in pools),
			"idle": sum(len(p._idle) for p in pools),
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
