"""pgBouncer as its admin console shows it: its settings, databases, users and pools, and how many server
connections those let a bench's sites open."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg2

from .model import Bench, Connect, Site, _group, _pool_key, demand


def admin_rows(connect: Callable[[], object], command: str) -> list[dict]:
	"""One admin-console command on a fresh connection; rows as dicts ([] for PAUSE, KILL, ...)."""
	conn = connect()
	try:
		conn.autocommit = True
		with conn.cursor() as cur:
			cur.execute(command)
			if cur.description is None:
				return []
			names = [d.name for d in cur.description]
			return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
	finally:
		conn.close()


def _number(value: object) -> float:
	try:
		return float(value)  # SHOW CONFIG gives text
	except (TypeError, ValueError):
		return 0.0


@dataclass(frozen=True)
class Bouncer:
	"""What pgBouncer's admin console says about its settings and pools."""

	address: str
	settings: dict
	databases: dict
	users: dict
	pools: list

	@classmethod
	def read(cls, address: str, connect: Connect) -> Bouncer:
		settings = {row["key"]: row["value"] for row in admin_rows(connect, "SHOW CONFIG")}
		databases = {row["name"]: row for row in admin_rows(connect, "SHOW DATABASES")}
		try:
			users = {row["name"]: row for row in admin_rows(connect, "SHOW USERS")}
		except psycopg2.Error:
			users = {}
		return cls(address, settings, databases, users, admin_rows(connect, "SHOW POOLS"))

	def _db(self, dbname: str) -> dict:
		return self.databases.get(dbname) or self.databases.get("*") or {}

	def _user(self, user: str) -> dict:
		return self.users.get(user) or {}

	def mode(self, dbname: str, user: str) -> str:
		return (
			self._user(user).get("pool_mode")
			or self._db(dbname).get("pool_mode")
			or self.settings.get("pool_mode")
			or "session"
		)

	def _user_override(self, user: str, column: str) -> int | None:
		"""A [users] setting of newer pgBouncers (SHOW USERS shows NULL where it is not set; older
		versions have no such column): it takes precedence over the database's and the global one."""
		value = self._user(user).get(column)
		if value is None or value == "" or _number(value) < 0:
			return None
		return int(_number(value))

	def size(self, dbname: str, user: str = "") -> int:
		override = self._user_override(user, "pool_size")
		if override is not None:
			return override
		return int(_number(self._db(dbname).get("pool_size"))) or int(
			_number(self.settings.get("default_pool_size"))
		)

	def size_setting(self, dbname: str, user: str) -> str:
		"""What to raise for a bigger pool: the setting that decides its size."""
		if self._user_override(user, "pool_size") is not None:
			return f"pool_size for user {user} (its [users] entry)"
		return f"default_pool_size (or pool_size for {dbname})"

	def reserve(self, dbname: str, user: str = "") -> int:
		override = self._user_override(user, "reserve_pool_size")
		if override is not None:
			return override
		entry = self._db(dbname)
		for column in ("reserve_pool", "reserve_pool_size"):  # SHOW DATABASES: 1.18, newer versions
			if entry.get(column) is not None:
				return int(_number(entry[column]))
		return int(_number(self.settings.get("reserve_pool_size")))

	def _cap(self, row: dict, column: str, setting: str) -> int:
		"""A cap shown in a SHOW DATABASES / SHOW USERS row (0 or absent: none there), else the global one."""
		return int(_number(row.get(column))) or int(_number(self.settings.get(setting)))

	def max_db(self, dbname: str) -> int:
		return self._cap(self._db(dbname), "max_connections", "max_db_connections")

	def max_user(self, user: str) -> int:
		# SHOW USERS of newer pgBouncers (not 1.18) gives the user's effective max_user_connections
		return self._cap(self._user(user), "max_user_connections", "max_user_connections")

	def max_db_clients(self, dbname: str) -> int:  # pgBouncer 1.24+, effective values in both views
		return self._cap(self._db(dbname), "max_client_connections", "max_db_client_connections")

	def max_user_clients(self, user: str) -> int:
		return self._cap(self._user(user), "max_user_client_connections", "max_user_client_connections")

	def min_pool(self, dbname: str, user: str = "") -> int:
		"""min_pool_size: servers pgBouncer keeps open in a pool even when idle (SHOW DATABASES has the
		database's own where it has one)."""
		override = self._user_override(user, "min_pool_size")
		if override is not None:
			return override
		value = self._db(dbname).get("min_pool_size")
		return int(_number(value)) or int(_number(self.settings.get("min_pool_size")))

	def pool_servers(
		self, bench: Bench, members: Sequence[Site], db: str, user: str, budget: object = None
	) -> int:
		"""Most server connections one (database, user) pool may hold, its database and user caps aside.

		Session mode: one per client, at most pool_size + reserve. Transaction mode: one per transaction in
		flight for its sites, at most pool_size + reserve, and a server lent once stays in the pool, idle,
		until server_idle_timeout (plain Frappe's disconnect inside its transaction makes pgBouncer drop
		it; a kept client's rollback gives it back): so the pool keeps the most it ever needed at once
		within that time, and at least min_pool_size."""
		size = self.size(db, user) + self.reserve(db, user)
		if self.mode(db, user) == "session":
			return min(size, demand(bench, members, budget).total)
		busy = min(size, demand(bench, members, budget, active=True).total)
		return max(busy, min(size, self.min_pool(db, user)))

	def pool_cap(self, db: str, user: str) -> int:
		"""Most servers one (database, user) pool can have: its size and reserve, its database's and its
		user's caps (each as if the pool had it alone); pgBouncer starts none beyond it."""
		caps = [self.size(db, user) + self.reserve(db, user), self.max_db(db), self.max_user(user)]
		return min((c for c in caps if c), default=0)

	def _with_ending(self, key: tuple[str, str], servers: int) -> int:
		"""A transaction-mode pool's most servers with the one an ending client's BEGIN may have pgBouncer
		start: only where all its servers can be busy (not where min_pool_size keeps more than its
		transactions) and below its cap."""
		if min(self.size(*key), self.min_pool(*key)) >= servers:
			return servers
		return min(self.pool_cap(*key), servers + 1)

	def _endings(
		self, bench: Bench, pools: dict, per: dict, keys: list, budget: object
	) -> tuple[dict[tuple[str, str], int], int]:
		"""For the transaction-mode pools `keys`: each one's most servers with an ending client's
		(_with_ending), and how many such servers there may be at once (one per pool, one per thread)."""
		most = {k: self._with_ending(k, per[k]) for k in keys}
		threads = demand(bench, [s for k in keys for s in pools[k]], budget, active=True).total
		return most, min(len(keys), threads)

	def opened(self, bench: Bench, sites: Sequence[Site], budget: object = None, capped: bool = True) -> int:
		"""Most server connections this pgBouncer's pools may open for `sites`: per pool (pool_servers),
		within max_db_connections and max_user_connections unless not `capped`. Only the transaction-mode
		pools of sites with a kept client each (client_budgeted) keep servers no client holds (see
		pool_servers): the others' together are at most the clients the bench holds for them, and the
		servers the ends of kept clients may start."""
		pools = _group(sites, _pool_key)
		per = {key: self.pool_servers(bench, members, *key, budget) for key, members in pools.items()}
		linger = {k for k in per if self.mode(*k) != "session" and any(s.client_budgeted for s in pools[k])}
		held = [k for k in per if k not in linger]
		# The end of a kept client behind transaction mode (an eviction, an idle close) sends BEGIN and
		# leaves, so that pgBouncer lends it the idle server its last return left and drops it. Where the
		# pool has no idle server then, the BEGIN waits (pgBouncer does not see the client leave while it
		# waits) and pgBouncer starts a server if the pool is below its cap, which the BEGIN then takes and
		# drops: one server more than the pool's transactions, for about one login. A thread ends at most
		# one kept client per checkout, so at once at most one such server per thread, one per pool.
		# (not `capped`: what the pools would open for their transactions without the caps, and an ending
		# client's server is never started beyond a cap: none counted)
		# A pool that keeps its clients' servers idle (linger) may get one more the same way, when all its
		# kept ones are busy at an end.
		ending = [k for k in held if self.mode(*k) != "session" and any(s.pooled for s in pools[k])]
		most, extra = self._endings(bench, pools, per, ending if capped else [], budget)
		total = min(
			sum(most.get(k, per[k]) for k in held),
			demand(bench, [s for k in held for s in pools[k]], budget).total + extra,
		)
		kept, extra = self._endings(bench, pools, per, list(linger) if capped else [], budget)
		total += min(sum(kept.get(k, per[k]) for k in linger), sum(per[k] for k in linger) + extra)
		most.update(kept)
		if capped:
			for index, cap_of in ((0, self.max_db), (1, self.max_user)):
				by_axis: dict[str, int] = {}
				for key, n in {**per, **most}.items():
					by_axis[key[index]] = by_axis.get(key[index], 0) + n
				total = min(total, sum(min(n, cap_of(name) or n) for name, n in by_axis.items()))
		return total
