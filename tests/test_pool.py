"""The pool engine against a real PostgreSQL behind a real pgBouncer (session mode, SCRAM)."""

from __future__ import annotations

import threading
import time

import psycopg2
import psycopg2.extensions as ext
import pytest

from frappe_pgpool.pool import ConnectionPool, PoolConfig, PoolTimeout

from .conftest import USERS, backend_pid, frappe_like_factory, key_for, scalar


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
	pool = ConnectionPool("site exhausted.local (app1@127.0.0.1/app1)", PoolConfig(size=2, timeout=0.3))
	connect = frappe_like_factory(bouncer)
	held = [pool.getconn(connect), pool.getconn(connect)]
	with pytest.raises(PoolTimeout) as raised:
		pool.getconn(connect)  # db_pool_timeout ends the wait (pytest-timeout is the hang detector)
	# it queued (a wait counted), then gave up: no connection over the size
	assert pool.snapshot()["waits"] == 1 and pool.snapshot()["waiting"] == 0
	message = str(raised.value)
	assert "exhausted.local" in message and "db_pool_size=2" in message and "2 in use" in message
	assert isinstance(raised.value, psycopg2.OperationalError)
	for conn in held:
		pool.putconn(conn)
	assert pool.snapshot()["timeouts"] == 1
	pool.close()


def test_a_returned_connection_goes_to_the_waiter_first(bouncer):
	pool = ConnectionPool("handoff", PoolConfig(size=1, timeout=5))
	connect = frappe_like_factory(bouncer)
	conn = pool.getconn(connect)
	got: list[ext.connection] = []
	waiter = threading.Thread(target=lambda: got.append(pool.getconn(connect)))
	waiter.start()
	deadline = time.monotonic() + 5
	while pool.snapshot()["waiting"] == 0 and time.monotonic() < deadline:
		time.sleep(0.001)
	pool.putconn(conn)
	waiter.join(5)
	assert got == [conn]  # handed over, not reopened
	stats = pool.snapshot()
	assert (stats["created"], stats["in_use"], stats["waiting"]) == (1, 1, 0)
	pool.putconn(conn)
	pool.close()


def test_many_threads_never_exceed_the_pool_size(bouncer, cluster):
	pool = ConnectionPool("threads", PoolConfig(size=3, timeout=10))
	connect = frappe_like_factory(bouncer, user="app2")
	errors: list[BaseException] = []
	peak = [0]
	lock = threading.Lock()

	def worker():
		try:
			for _ in range(50):
				conn = pool.getconn(connect)
				with lock:
					peak[0] = max(peak[0], pool.snapshot()["in_use"])
				unit_of_work(conn, "SELECT pg_sleep(0.001)")
				pool.putconn(conn)
		except BaseException as e:
			errors.append(e)

	threads = [threading.Thread(target=worker) for _ in range(8)]
	for t in threads:
		t.start()
	for t in threads:
		t.join(60)
	assert not errors
	stats = pool.snapshot()
	assert peak[0] <= 3 and stats["created"] <= 3 and stats["in_use"] == 0
	assert stats["checkouts"] == 400
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
	# one connection per site, kept; b and c had one more each at the start: their first checkouts came
	# after a's return and were misses, so keeping did not pay yet and those were closed on return
	assert sorted(seen.values()) == ["site-a", "site-b", "site-b", "site-c", "site-c"]


def test_key_never_exposes_the_password():
	key = key_for("app1", "s")
	assert "pw-app1" not in repr(key) and "pw-app1" not in key.label
	assert key != key_for("app2", "s")
