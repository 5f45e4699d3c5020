"""The pool engine against a real PostgreSQL behind a real pgBouncer (session mode, SCRAM)."""

from __future__ import annotations

import threading

import psycopg2
import psycopg2.extensions as ext
import pytest

from frappe_pgpool.pool import ConnectionPool, PoolConfig, PoolTimeout, ProcessBudget

from .conftest import HANG, USERS, backend_pid, frappe_like_factory, key_for, scalar, wait_for


def unit_of_work(conn: ext.connection, sql: str = "SELECT 1") -> None:
	"""Like a Frappe request: statements in psycopg2's implicit transaction, returned still open."""
	with conn.cursor() as cur:
		cur.execute(sql)


def test_sequential_checkouts_reuse_one_connection_and_one_login(bouncer, registry, config):
	connect = frappe_like_factory(bouncer)
	key = key_for(bouncer=bouncer)
	logins_before = bouncer.logins("app1")
	pids = set()
	for _ in range(1000):
		conn = registry.getconn(key, config, connect)
		pids.add(backend_pid(conn))
		assert registry.putconn(conn)
	assert len(pids) == 1
	assert bouncer.logins("app1") - logins_before == 1
	stats = registry.pool(key, config).snapshot()
	assert (stats["checkouts"], stats["created"], stats["in_use"], stats["idle"]) == (1000, 1, 0, 1)


@pytest.mark.parametrize(
	("level", "name"),
	[
		(ext.ISOLATION_LEVEL_REPEATABLE_READ, "repeatable read"),
		(ext.ISOLATION_LEVEL_READ_COMMITTED, "read committed"),
	],
)
def test_isolation_level_of_the_factory_is_kept(bouncer, registry, config, level, name):
	connect = frappe_like_factory(bouncer, isolation=level)
	key = key_for(bouncer=bouncer, site=f"iso-{level}")
	for _ in range(3):
		conn = registry.getconn(key, config, connect)
		assert scalar(conn, "SHOW transaction_isolation") == name
		# a request changing psycopg2's session characteristics must not pass them on
		conn.rollback()
		conn.set_session(isolation_level="SERIALIZABLE", readonly=True, autocommit=False)
		assert scalar(conn, "SHOW transaction_isolation") == "serializable"
		registry.putconn(conn)
	conn = registry.getconn(key, config, connect)
	assert scalar(conn, "SHOW transaction_isolation") == name
	assert scalar(conn, "SHOW transaction_read_only") == "off"
	assert registry.pool(key, config).snapshot()["created"] == 1
	registry.putconn(conn)


def test_exceptions_mid_work_return_the_connection_and_nothing_leaks(bouncer, cluster, registry, config):
	connect = frappe_like_factory(bouncer)
	key = key_for(bouncer=bouncer, site="failing")
	pool = registry.pool(key, config)
	failures = 0
	for i in range(1000):
		conn = registry.getconn(key, config, connect)
		try:
			if i % 3 == 0:
				unit_of_work(conn, "SELECT 1/0")  # server error: transaction aborted
			elif i % 3 == 1:
				unit_of_work(conn)
				raise RuntimeError("application error mid request")
			else:
				unit_of_work(conn)
		except (psycopg2.Error, RuntimeError):
			failures += 1
		finally:
			registry.putconn(conn)
	stats = pool.snapshot()
	assert failures == 667
	assert (stats["in_use"], stats["size"], stats["created"]) == (0, 1, 1)
	assert len([b for b in cluster.backends("app1") if b["usename"] == "app1"]) >= 1
	conn = registry.getconn(key, config, connect)
	assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
	registry.putconn(conn)


SESSION_STATE = [
	("SET work_mem = '77MB'", "SHOW work_mem", "4MB"),
	(
		"SELECT set_config('app.tenant', 'acme', false)",
		"SELECT coalesce(current_setting('app.tenant', true), '')",
		"",
	),
	("SET ROLE other_role", "SELECT current_user", "app1"),
	("CREATE TEMP TABLE scratch (x int)", "SELECT to_regclass('pg_temp.scratch') IS NULL", True),
	(
		"SELECT pg_advisory_lock(4242)",
		"SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
		0,
	),
	("LISTEN some_channel", "SELECT count(*) FROM pg_listening_channels()", 0),
	("PREPARE plan1 AS SELECT 1", "SELECT count(*) FROM pg_prepared_statements", 0),
	("DECLARE held CURSOR WITH HOLD FOR SELECT 1", "SELECT count(*) FROM pg_cursors", 0),
	("SET TIME ZONE 'Asia/Kolkata'", "SHOW TimeZone", None),
	("SET application_name = 'hijacked'", "SHOW application_name", None),
]


@pytest.mark.parametrize(
	("dirty", "probe", "clean"), SESSION_STATE, ids=[s[0].split()[0:2][-1] for s in SESSION_STATE]
)
@pytest.mark.parametrize("committed", [True, False], ids=["committed", "left-in-transaction"])
def test_session_state_does_not_leak_into_the_next_checkout(
	bouncer, registry, config, dirty, probe, clean, committed
):
	connect = frappe_like_factory(bouncer)
	key = key_for(bouncer=bouncer, site="state")
	conn = registry.getconn(key, config, connect)
	baseline = scalar(conn, probe)
	if clean is None:
		clean = baseline
	pid = backend_pid(conn)
	unit_of_work(conn, dirty)
	if committed:
		conn.commit()
	registry.putconn(conn)
	conn = registry.getconn(key, config, connect)
	assert backend_pid(conn) == pid  # the same connection, reset, not a new one
	assert scalar(conn, probe) == clean
	registry.putconn(conn)


def test_application_name_survives_the_reset_through_pgbouncer(bouncer, cluster, registry, config):
	"""pgBouncer applies a client's application_name with a SET, which RESET ALL would wipe."""

	def connect():
		conn = psycopg2.connect(
			bouncer.dsn("app1", USERS["app1"], "app1", application_name="frappe:site-a:42")
		)
		conn.set_isolation_level(ext.ISOLATION_LEVEL_REPEATABLE_READ)
		return conn

	key = key_for(bouncer=bouncer, site="appname")
	for _ in range(3):
		conn = registry.getconn(key, config, connect)
		unit_of_work(conn, "SET application_name = 'someone else'")
		pid = backend_pid(conn)
		registry.putconn(conn)
	conn = registry.getconn(key, config, connect)
	assert scalar(conn, "SHOW application_name") == "frappe:site-a:42"
	assert scalar(conn, "SHOW transaction_isolation") == "repeatable read"
	registry.putconn(conn)
	(row,) = [b for b in cluster.backends("app1") if b["pid"] == pid]
	assert row["application_name"] == "frappe:site-a:42"
	names = {
		c["application_name"] for c in bouncer.clients() if c["user"] == "app1" and c["database"] == "app1"
	}
	assert "frappe:site-a:42" in names


def test_discard_or_unknown_state_is_never_reused(bouncer, registry, config):
	connect = frappe_like_factory(bouncer)
	key = key_for(bouncer=bouncer, site="discard")
	conn = registry.getconn(key, config, connect)
	first = backend_pid(conn)
	registry.putconn(conn, discard=True)
	assert conn.closed
	conn = registry.getconn(key, config, connect)
	assert backend_pid(conn) != first
	conn.close()  # closed behind the pool's back
	registry.putconn(conn)
	stats = registry.pool(key, config).snapshot()
	assert stats["closed"] == {"discarded": 1, "broken": 1}
	assert (stats["size"], stats["in_use"]) == (0, 0)


def test_exhaustion_waits_then_raises_a_clear_error(bouncer, config):
	"""Only the process budget makes a checkout wait (db_pool_size bounds what a pool keeps)."""
	pool = ConnectionPool(
		"site exhausted.local (app1@127.0.0.1/app1)",
		PoolConfig(size=2, timeout=0.3),
		budget=ProcessBudget(setting=2),
	)
	connect = frappe_like_factory(bouncer)
	held = [pool.getconn(connect), pool.getconn(connect)]
	outcome: list[PoolTimeout] = []

	def other_request() -> None:  # another thread: one holding a checkout never waits (an overdraft)
		try:
			pool.getconn(connect)  # db_pool_timeout ends the wait (the join below only detects a hang)
		except PoolTimeout as e:
			outcome.append(e)

	thread = threading.Thread(target=other_request)
	thread.start()
	thread.join(60)
	(raised,) = outcome
	# it queued (a wait counted), then gave up: nothing opened over the budget
	assert pool.snapshot()["waits"] == 1 and pool.snapshot()["waiting"] == 0
	message = str(raised)
	assert "exhausted.local" in message and "db_pool_process_budget=2" in message and "2 in use" in message
	assert isinstance(raised, psycopg2.OperationalError)
	for conn in held:
		pool.putconn(conn)
	assert pool.snapshot()["timeouts"] == 1
	pool.close()


def test_a_returned_connection_goes_to_the_waiter_first(bouncer):
	pool = ConnectionPool("handoff", PoolConfig(size=1, timeout=HANG), budget=ProcessBudget(setting=1))
	connect = frappe_like_factory(bouncer)
	conn = pool.getconn(connect)
	got: list[ext.connection] = []
	waiter = threading.Thread(target=lambda: got.append(pool.getconn(connect)))
	waiter.start()
	wait_for(lambda: pool.snapshot()["waiting"] == 1, "the waiter queued")
	pool.putconn(conn)
	waiter.join(HANG)
	assert got == [conn]  # handed over, not reopened
	stats = pool.snapshot()
	assert (stats["created"], stats["in_use"], stats["waiting"]) == (1, 1, 0)
	pool.putconn(conn)
	pool.close()


def test_many_threads_never_make_the_pool_keep_more_than_its_size(bouncer, cluster):
	"""8 threads on a pool of size 3: none waits for the pool (db_pool_size bounds what it keeps); the
	connections opened beyond the 3 it keeps are closed on return, as plain Frappe closes them."""
	pool = ConnectionPool("threads", PoolConfig(size=3, timeout=10))
	connect = frappe_like_factory(bouncer, user="app2")
	errors: list[BaseException] = []
	most_idle = [0]
	lock = threading.Lock()

	def worker():
		try:
			for _ in range(50):
				conn = pool.getconn(connect)
				unit_of_work(conn, "SELECT pg_sleep(0.001)")
				pool.putconn(conn)
				with lock:
					most_idle[0] = max(most_idle[0], pool.snapshot()["idle"])
		except BaseException as e:
			errors.append(e)

	threads = [threading.Thread(target=worker) for _ in range(8)]
	for t in threads:
		t.start()
	for t in threads:
		t.join(60)
	assert not errors
	stats = pool.snapshot()
	assert (
		most_idle[0] <= 3 and stats["idle"] <= 3 and stats["size"] == stats["idle"] and stats["in_use"] == 0
	)
	assert stats["checkouts"] == 400 and (stats["waits"], stats["timeouts"]) == (0, 0)
	# every connection opened beyond those kept was opened not to be kept, and closed on return
	assert set(stats["closed"]) <= {"over_size"}
	assert (
		stats["created"] - stats["over_size"] <= 3
		and stats["closed"].get("over_size", 0) == stats["over_size"]
	)
	pool.close()


def test_a_pool_at_size_opens_a_connection_it_does_not_keep_instead_of_waiting(bouncer, registry):
	"""db_pool_size bounds what a pool keeps, not what it may open (issue 23): a gthread worker with more
	threads than db_pool_size serves the extra concurrent requests as plain Frappe does, with a connection
	opened for the request and closed at its end, never a wait for its own pool."""
	from frappe_pgpool.pool import opening_to_keep

	config = PoolConfig(enabled=True, size=2, timeout=0.2)  # a wait for the pool fails fast
	key = key_for(bouncer=bouncer, site="over-size.local")
	factory = frappe_like_factory(bouncer)
	kept: list[bool] = []

	def connect() -> ext.connection:
		kept.append(opening_to_keep())
		return factory()

	together = threading.Barrier(4)  # three requests holding a connection each, and this thread
	release = threading.Event()
	got: list[ext.connection] = []
	errors: list[BaseException] = []

	def request() -> None:
		try:
			conn = registry.getconn(key, config, connect)
			got.append(conn)
			backend_pid(conn)
			together.wait(HANG)
			release.wait(HANG)
			registry.putconn(conn)
		except BaseException as e:
			errors.append(e)
			together.abort()

	threads = [threading.Thread(target=request) for _ in range(3)]
	for t in threads:
		t.start()
	try:
		together.wait(HANG)  # all three hold one at once: the third did not wait for the first two
		during = registry.pool(key, config).snapshot()
	except threading.BrokenBarrierError:
		during = None
	finally:
		release.set()
		for t in threads:
			t.join(HANG)
	assert not errors, errors
	assert (during["in_use"], during["waiting"], during["over_size"]) == (3, 0, 1)
	assert sorted(kept) == [False, True, True]  # the third was opened not to be kept
	stats = registry.pool(key, config).snapshot()
	assert (stats["idle"], stats["in_use"], stats["size"], stats["created"]) == (2, 0, 2, 3)
	assert stats["closed"] == {"over_size": 1} and sum(c.closed for c in got) == 1
	assert (stats["waits"], stats["timeouts"]) == (0, 0)
	assert registry.snapshot()["open"] == 2


@pytest.mark.parametrize("budget", ["auto", 1])
def test_a_nested_checkout_never_waits_for_its_own_thread(bouncer, registry, budget):
	"""A request holding its pool's only connection (db_pool_size 1) that checks out again (a nested
	checkout) would wait for a connection only it can give back: it opens one as plain Frappe would, not
	kept; with a numeric budget too (an overdraft), and the process is back within both when it returns."""
	config = PoolConfig(enabled=True, size=1, timeout=0.2)
	key = key_for(bouncer=bouncer, site="nested-size.local")
	connect = frappe_like_factory(bouncer)
	outer = registry.getconn(key, config, connect, budget)
	inner = registry.getconn(key, config, connect, budget)
	assert inner is not outer and backend_pid(inner) != backend_pid(outer)
	registry.putconn(inner)
	registry.putconn(outer)
	assert inner.closed and not outer.closed
	stats = registry.pool(key, config).snapshot()
	assert (stats["idle"], stats["in_use"], stats["closed"], stats["timeouts"]) == (1, 0, {"over_size": 1}, 0)
	snap = registry.snapshot()
	assert (snap["open"], snap["budget_overdrafts"]) == (1, 0 if budget == "auto" else 1)


def test_a_numeric_budget_still_makes_a_checkout_wait_and_db_pool_size_does_not(bouncer, registry):
	"""db_pool_size 1 and db_pool_process_budget 2: a second request opens a connection the pool does not
	keep; a third, from another thread, waits for the budget (and fails with its message after
	db_pool_timeout), never for the pool."""
	config = PoolConfig(enabled=True, size=1, timeout=0.3)
	key = key_for(bouncer=bouncer, site="budget-not-size.local")
	connect = frappe_like_factory(bouncer)
	holding = threading.Barrier(3)
	release = threading.Event()
	errors: list[BaseException] = []

	def request() -> None:
		try:
			conn = registry.getconn(key, config, connect, 2)
			holding.wait(HANG)
			release.wait(HANG)
			registry.putconn(conn)
		except BaseException as e:
			errors.append(e)
			holding.abort()

	threads = [threading.Thread(target=request) for _ in range(2)]
	for t in threads:
		t.start()
	try:
		holding.wait(HANG)  # two held at once, on a pool of size 1
		with pytest.raises(PoolTimeout) as raised:
			registry.getconn(key, config, connect, 2)
	except threading.BrokenBarrierError:
		pass  # a request failed: shown below
	finally:
		release.set()
		for t in threads:
			t.join(HANG)
	assert not errors, errors
	assert "db_pool_process_budget=2" in str(raised.value) and "db_pool_size" not in str(raised.value)
	stats = registry.pool(key, config).snapshot()
	assert (stats["budget_waits"], stats["budget_timeouts"], stats["timeouts"]) == (1, 1, 1)
	assert (stats["idle"], stats["closed"], stats["over_size"]) == (1, {"over_size": 1}, 1)


def test_a_pool_keeps_no_more_than_its_size_when_it_was_lowered_meanwhile(bouncer):
	"""Three out on a pool of 2 (the third not kept), the size lowered to 1: the returns keep one, close
	the over-size one as plain Frappe's (over_size) and the kept one beyond the new size (shrunk)."""
	pool = ConnectionPool("shrink", PoolConfig(size=2, timeout=0.2))
	connect = frappe_like_factory(bouncer)
	held = [pool.getconn(connect) for _ in range(3)]
	assert pool.snapshot()["over_size"] == 1
	pool.reconfigure(PoolConfig(size=1, timeout=0.2))
	for conn in held:
		pool.putconn(conn)
	stats = pool.snapshot()
	assert (stats["idle"], stats["size"], stats["closed"]) == (1, 1, {"over_size": 1, "shrunk": 1})
	pool.reconfigure(PoolConfig(size=3, timeout=0.2))  # raised: kept up to 3 again, nothing closed
	held = [pool.getconn(connect) for _ in range(4)]
	for conn in held:
		pool.putconn(conn)
	stats = pool.snapshot()
	assert (stats["idle"], stats["over_size"], stats["closed"]) == (3, 2, {"over_size": 2, "shrunk": 1})
	pool.close()


def test_two_sites_never_share_a_connection(bouncer, registry, config):
	connects = {"app1": frappe_like_factory(bouncer, "app1"), "app2": frappe_like_factory(bouncer, "app2")}
	# same credentials under two site names must not share either
	keys = {
		"site-a": ("app1", key_for("app1", "site-a", bouncer)),
		"site-b": ("app2", key_for("app2", "site-b", bouncer)),
		"site-c": ("app1", key_for("app1", "site-c", bouncer)),
	}
	seen: dict[int, str] = {}
	every_conn = []  # keeps ids unique: a closed connection's id could be reused by a new one
	for i in range(300):
		site = ("site-a", "site-b", "site-c")[i % 3]
		user, key = keys[site]
		# a budget of 3 keeps one connection per site (under "auto", one at a time, replaced each time)
		conn = registry.getconn(key, config, connects[user], process_budget=3)
		every_conn.append(conn)
		assert scalar(conn, "SELECT current_user || '/' || current_database()") == f"{user}/{user}"
		assert seen.setdefault(id(conn), site) == site
		registry.putconn(conn)
	# one connection per site, kept from each site's first checkout (which could not hit, so under a
	# numeric budget it does not count as a miss that shuts the reuse gate)
	assert sorted(seen.values()) == ["site-a", "site-b", "site-c"]


def test_key_never_exposes_the_password():
	key = key_for("app1", "s")
	assert "pw-app1" not in repr(key) and "pw-app1" not in key.label
	assert key != key_for("app2", "s")
