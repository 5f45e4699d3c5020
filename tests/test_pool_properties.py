"""A Hypothesis state machine over checkout / return / discard / kill / resize / budget / fork on a real pool.

Invariants after every step: in use + idle never above the size the pool allows, no connection in
two places, what the model holds is exactly what the pool says is in use, connections of one key
never appear under another, a forked child never gets one of them, and the process budget holds: the
connections open across both sites are what the pools hold, never more than the budget ("auto": the
most checkouts held at once) unless that many are in use after the budget was lowered.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
import psycopg2
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from frappe_pgpool.pool import PoolConfig, PoolRegistry, PoolTimeout

from .conftest import backend_pid, frappe_like_factory, key_for, scalar

SITES = ("prop-a", "prop-b")


class PoolMachine(RuleBasedStateMachine):
	bouncer = None
	cluster = None

	def __init__(self) -> None:
		super().__init__()
		self.registry = PoolRegistry(reap_interval=0)  # the reap rule below runs it, deterministically
		self.size = 2
		self.budget: int | None = None  # db_pool_process_budget: None is "auto"
		self.most_held = 0  # the model's own high-water mark of checkouts running at once
		self.keys = {
			site: key_for("app1" if site == "prop-a" else "app2", site, self.bouncer) for site in SITES
		}
		self.connects = {
			"prop-a": frappe_like_factory(self.bouncer, "app1"),
			"prop-b": frappe_like_factory(self.bouncer, "app2"),
		}
		self.held: list[tuple[str, object]] = []
		self.owner: dict[int, str] = {}  # id(conn) -> site, for every connection ever handed out
		self.pids: dict[int, int] = {}  # id(conn) -> its backend pid when handed out
		self.killed: set[int] = set()
		self.every_conn: list[object] = []

	def config(self) -> PoolConfig:
		return PoolConfig(size=self.size, timeout=0.05)

	def pool(self, site: str):
		return self.registry.pool(self.keys[site], self.config())

	@rule(site=st.sampled_from(SITES))
	def checkout(self, site: str) -> None:
		budget = "auto" if self.budget is None else self.budget
		self.most_held = max(self.most_held, len(self.held) + 1)  # this checkout runs alongside them
		try:
			conn = self.registry.getconn(self.keys[site], self.config(), self.connects[site], budget)
		except PoolTimeout as e:  # only the budget makes a checkout wait, never db_pool_size
			assert "db_pool_process_budget" in str(e)
			assert self.budget is not None and len(self.held) >= self.budget
			return
		assert self.owner.setdefault(id(conn), site) == site
		self.every_conn.append(conn)  # keeps ids unique: a freed object's id could be reused
		user = "app1" if site == "prop-a" else "app2"
		assert scalar(conn, "SELECT current_user") == user
		self.pids[id(conn)] = backend_pid(conn)
		self.held.append((site, conn))

	@precondition(lambda self: self.held)
	@rule(index=st.integers(min_value=0), discard=st.booleans(), dirty=st.booleans())
	def give_back(self, index: int, discard: bool, dirty: bool) -> None:
		_site, conn = self.held.pop(index % len(self.held))
		if dirty:
			try:
				with conn.cursor() as cur:
					cur.execute("SET work_mem = '7MB'")
			except psycopg2.OperationalError:
				pass  # its backend was killed: the return must discard it
		assert self.registry.putconn(conn, discard=discard)
		assert not self.registry.putconn(conn)  # a second return is refused

	@precondition(lambda self: self.held)
	@rule(index=st.integers(min_value=0))
	def kill_backend_of_a_held_connection(self, index: int) -> None:
		_site, conn = self.held[index % len(self.held)]
		with self.cluster.connect() as admin, admin.cursor() as cur:
			cur.execute("SELECT pg_terminate_backend(%s)", (self.pids[id(conn)],))
		self.killed.add(id(conn))

	@rule()
	def reap(self) -> None:
		self.registry.maintain()  # what the reaper thread does every second

	@rule(size=st.integers(min_value=1, max_value=3))
	def resize(self, size: int) -> None:
		self.size = size
		for site in SITES:
			self.pool(site)  # applies the new config

	@rule(budget=st.sampled_from([None, 1, 2, 3]))
	def set_budget(self, budget: int | None) -> None:
		self.budget = budget
		self.registry.set_process_budget("auto" if budget is None else budget)

	@rule()
	def fork(self) -> None:
		# backends the parent still holds (a killed one's pid may be recycled by the OS)
		alive = [r.conn for site in SITES for r in self.pool(site)._idle]
		alive += [conn for _, conn in self.held if id(conn) not in self.killed]
		known = {self.pids[id(conn)] for conn in alive}
		pid = os.fork()
		if pid == 0:  # pragma: no cover - child
			code = 0
			try:
				conn = self.registry.getconn(self.keys["prop-a"], self.config(), self.connects["prop-a"])
				code = 3 if backend_pid(conn) in known else 0
				self.registry.putconn(conn)
			except BaseException:
				code = 4
			os._exit(code)
		_, status = os.waitpid(pid, 0)
		assert os.waitstatus_to_exitcode(status) == 0

	@invariant()
	def counts_are_consistent(self) -> None:
		for site in SITES:
			snap = self.pool(site).snapshot()
			held = sum(1 for s, _ in self.held if s == site)
			assert snap["in_use"] == held
			assert snap["idle"] + snap["in_use"] <= max(self.size, held)
			assert snap["waiting"] == 0 and snap["opening"] == 0

	@invariant()
	def budget_holds(self) -> None:
		snap = self.registry.snapshot()
		sizes = sum(self.pool(site).snapshot()["size"] for site in SITES)
		assert snap["open"] == sizes and snap["active"] == len(self.held) == snap["in_use"]
		assert snap["peak"] == self.most_held and snap["waiting"] == 0
		limit = self.most_held if self.budget is None else self.budget
		assert snap["limit"] == limit
		assert snap["open"] <= max(limit, len(self.held))

	@invariant()
	def no_connection_in_two_places(self) -> None:
		idle_ids = [id(r.conn) for site in SITES for r in self.pool(site)._idle]
		held_ids = [id(conn) for _, conn in self.held]
		assert len(set(idle_ids)) == len(idle_ids)
		assert not set(idle_ids) & set(held_ids)
		for site in SITES:
			for record in self.pool(site)._idle:
				assert self.owner[id(record.conn)] == site

	def teardown(self) -> None:
		for _site, conn in self.held:
			self.registry.putconn(conn)
		self.registry.close_all()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
	max_examples=25, stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(autouse=True)
def _bind(request, bouncer, cluster):
	PoolMachine.bouncer = bouncer
	PoolMachine.cluster = cluster
