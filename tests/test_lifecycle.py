"""A kept session ends where plain Frappe's would (issue 23, items 1, 3, 5b, 6, 8), on real PostgreSQL and
a real pgBouncer.

Plain Frappe closes its connection inside the request's transaction: pgBouncer drops the server behind it,
and nothing of the session outlives the request. The pool keeps sessions longer; where one ends (an
eviction for another site, a return over the budget, a lifetime, a process's exit) it must end the same
way, without waiting on that session's server, and what it hands back to a transaction pooler must hold
no more than plain Frappe's close would leave.

A bound on a thread's join below is a hang detector (the defect blocked until the path came back), never a
measure of speed: the assertion is that the checkout ended while the other site's server was still stalled.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading

import psycopg2
import psycopg2.extensions as ext
import pytest

from frappe_pgpool.pool import PoolConfig, PoolKey, PoolRegistry
from frappe_pgpool.testing.cluster import PgBouncer
from frappe_pgpool.testing.proxy import StallingProxy

from .conftest import USERS, frappe_like_factory, key_for, scalar, wait_for

HANG = 20.0  # seconds before a checkout still blocked counts as hung


def pools(bouncer: PgBouncer, dbname: str) -> dict:
	rows = [row for row in bouncer.admin("SHOW POOLS") if row["database"] == dbname]
	assert len(rows) <= 1, rows
	return rows[0] if rows else {}


def servers(bouncer: PgBouncer, dbname: str) -> int:
	"""Server connections pgBouncer holds for dbname now (idle, used, active, tested, login)."""
	row = pools(bouncer, dbname)
	return sum(int(row.get(k, 0)) for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))


def checkout_in_thread(registry, key, config, connect, budget):
	"""Start a checkout in a thread; returns (thread, result dict with 'conn' or 'error')."""
	result: dict = {}

	def run():
		try:
			result["conn"] = registry.getconn(key, config, connect, budget)
		except BaseException as e:  # reported to the test
			result["error"] = e

	thread = threading.Thread(target=run, daemon=True)
	thread.start()
	return thread, result


def test_an_eviction_never_waits_on_the_evicted_sites_stalled_server(cluster, registry):
	"""Item 1: the budget evicts site B's idle connection to open one for site A. B's path is stalled
	(a network that drops packets silently): A's checkout must not wait on B's server at all."""
	with PgBouncer(cluster, users=USERS) as bouncer, StallingProxy(bouncer.host, bouncer.port) as proxy:
		config = PoolConfig(enabled=True, size=1)
		key_b = key_for("app2", site="b.local", bouncer=bouncer)
		key_a = key_for("app1", site="a.local", bouncer=bouncer)

		def connect_b():
			return psycopg2.connect(bouncer.dsn("app2", USERS["app2"], "app2", port=proxy.port))

		registry.putconn(registry.getconn(key_b, config, connect_b, 1))
		assert registry.pool(key_b, config).snapshot()["idle"] == 1
		proxy.stall()
		try:
			thread, result = checkout_in_thread(registry, key_a, config, frappe_like_factory(bouncer), 1)
			thread.join(HANG)
			blocked = thread.is_alive()
		finally:
			proxy.resume()
		thread.join(HANG)
		assert not blocked, "site A's checkout waited on site B's stalled server"
		assert "conn" in result, result
		assert scalar(result["conn"], "SELECT 1") == 1
		registry.putconn(result["conn"])
		assert registry.pool(key_b, config).snapshot()["evictions"] == {"budget": 1}


def test_an_eviction_never_waits_for_a_server_of_a_saturated_transaction_pool(cluster, registry):
	"""Item 1: behind pgBouncer in transaction mode B's only server is busy in another client's
	transaction. Evicting B's idle client waits for no server (its BEGIN, sent without waiting, queues in
	pgBouncer and goes with the client), so A goes on."""
	with PgBouncer(cluster, users=USERS, pool_mode="transaction", default_pool_size=1) as bouncer:
		config = PoolConfig(enabled=True, size=1, pgbouncer_mode="transaction")
		key_b = key_for("app2", site="b.local", bouncer=bouncer)
		key_a = key_for("app1", site="a.local", bouncer=bouncer)
		registry.set_process_clients(1)  # transaction-mode pools' budget: one kept client, so A evicts B's
		conn_b = registry.getconn(key_b, config, frappe_like_factory(bouncer, "app2"), 1)
		scalar(conn_b, "SELECT 1")
		registry.putconn(conn_b)
		blocker = bouncer.connect("app2", USERS["app2"])  # holds B's only server in a transaction
		try:
			scalar(blocker, "SELECT 1")
			thread, result = checkout_in_thread(registry, key_a, config, frappe_like_factory(bouncer), 1)
			thread.join(HANG)
			blocked = thread.is_alive()
			started = servers(bouncer, "app2") - 1  # beside the blocker's
		finally:
			blocker.rollback()
			blocker.close()
		thread.join(HANG)
		assert not blocked, "site A's checkout waited for a server of site B's saturated pool"
		assert started == 0  # B's pool started no server for the queued BEGIN
		# pgBouncer reads a queued client's goodbye once a server frees: its BEGIN then goes with it, and
		# B's queue is empty again (the server it took is dropped, as plain Frappe's close drops one)
		wait_for(
			lambda: int(pools(bouncer, "app2").get("cl_waiting", 0)) == 0, lambda: str(pools(bouncer, "app2"))
		)
		registry.putconn(result["conn"])
		assert registry.pool(key_b, config).snapshot()["evictions"] == {"budget": 1}


def test_an_evicted_session_mode_connection_takes_its_server_with_it(cluster, registry):
	"""Item 1, what the eviction still owes: like plain Frappe's close, pgBouncer drops the server
	behind the evicted connection (no idle backend left per evicted site), without a waited round trip."""
	with PgBouncer(cluster, users=USERS) as bouncer:
		config = PoolConfig(enabled=True, size=1)
		key_b = key_for("app2", site="b.local", bouncer=bouncer)
		key_a = key_for("app1", site="a.local", bouncer=bouncer)
		registry.putconn(registry.getconn(key_b, config, frappe_like_factory(bouncer, "app2"), 1))
		assert servers(bouncer, "app2") == 1
		conn = registry.getconn(key_a, config, frappe_like_factory(bouncer), 1)  # evicts B's
		registry.putconn(conn)
		wait_for(lambda: servers(bouncer, "app2") == 0, lambda: str(pools(bouncer, "app2")))


@pytest.mark.parametrize("clients", ["auto", 4], ids=["peak-rule", "client-budget"])
def test_kept_transaction_mode_clients_leave_no_idle_server_per_site_when_they_end(cluster, clients):
	"""Behind pgBouncer in transaction mode a kept client's return gives its server back to that site's
	pgBouncer pool idle, kept until server_idle_timeout. One process serving a busy site between quiet
	ones keeps and evicts clients of the quiet ones: each eviction (and the end of them all) takes that
	idle server with it, so PostgreSQL is left with no idle backend per site served, as after plain
	Frappe (before: one per site, 6 here)."""
	names = [f"ends{clients}_{i}" for i in range(6)]
	users = {name: f"pw-{name}" for name in names}
	for name, password in users.items():
		cluster.create_role(name, password)
		cluster.create_database(name, owner=name)
	registry = PoolRegistry(reap_interval=0)
	registry.set_process_clients(clients)
	config = PoolConfig(enabled=True, size=8, timeout=5, pgbouncer_mode="transaction")
	with PgBouncer(cluster, users=users, pool_mode="transaction", default_pool_size=4) as bouncer:

		def request(name: str) -> None:
			key = PoolKey.make(f"{name}.local", "127.0.0.1", bouncer.port, name, name, users[name])
			conn = registry.getconn(
				key, config, lambda: psycopg2.connect(bouncer.dsn(name, users[name], name))
			)
			scalar(conn, "SELECT 1")
			registry.putconn(conn)

		try:
			for _ in range(10):
				request(names[0])
			for name in names[1:]:
				request(name)
				request(names[0])
			kept = registry.snapshot()["open"]
			idle = lambda: sum(b["datname"] in names for b in cluster.backends())  # noqa: E731
			wait_for(lambda: idle() <= kept, lambda: f"{idle()} idle backends, {kept} kept")
		finally:
			registry.close_all()
		wait_for(lambda: idle() == 0, lambda: f"{idle()} idle backends after close_all")


def test_a_transaction_mode_return_leaves_no_session_advisory_lock_on_the_lent_server(cluster, registry):
	"""Item 6: a request takes a session advisory lock. Plain Frappe's close inside the transaction makes
	pgBouncer discard the server, and the lock with it; the pool's return must not hand it on."""
	with PgBouncer(cluster, users=USERS, pool_mode="transaction", default_pool_size=1) as bouncer:
		config = PoolConfig(enabled=True, size=1, pgbouncer_mode="transaction")
		key = key_for(bouncer=bouncer)
		connect = frappe_like_factory(bouncer)
		taken = []
		for _ in range(3):
			conn = registry.getconn(key, config, connect)
			taken.append(scalar(conn, "SELECT pg_try_advisory_lock(4242)"))
			registry.putconn(conn)
		# default_pool_size 1: the next client is lent the same server
		other = bouncer.connect("app1", USERS["app1"])
		try:
			held = scalar(
				other, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
			)
		finally:
			other.close()
		assert taken == [True, True, True]
		assert held == 0


def test_a_failed_transaction_mode_request_leaves_no_session_advisory_lock_either(cluster, registry):
	"""Item 6, a request whose transaction failed after taking the lock: still released, and kept."""
	with PgBouncer(cluster, users=USERS, pool_mode="transaction", default_pool_size=1) as bouncer:
		config = PoolConfig(enabled=True, size=1, pgbouncer_mode="transaction")
		key = key_for(bouncer=bouncer)
		conn = registry.getconn(key, config, frappe_like_factory(bouncer))
		assert scalar(conn, "SELECT pg_try_advisory_lock(4343)")
		with pytest.raises(psycopg2.errors.DivisionByZero):
			scalar(conn, "SELECT 1/0")
		registry.putconn(conn)
		assert registry.snapshot()["idle"] == 1
		conn = registry.getconn(key, config, frappe_like_factory(bouncer))
		held = scalar(
			conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
		)
		registry.putconn(conn)
		assert held == 0


def test_a_transaction_mode_return_leaves_no_prepared_statement_on_the_lent_server(cluster, registry):
	"""Item 6: PREPARE survives a rollback: the server it is on is dropped, as plain Frappe's would be."""
	with PgBouncer(cluster, users=USERS, pool_mode="transaction", default_pool_size=1) as bouncer:
		config = PoolConfig(enabled=True, size=1, pgbouncer_mode="transaction")
		key = key_for(bouncer=bouncer)
		conn = registry.getconn(key, config, frappe_like_factory(bouncer))
		scalar(conn, "SELECT 1")
		conn.cursor().execute("PREPARE leftover AS SELECT 1")
		registry.putconn(conn)
		other = bouncer.connect("app1", USERS["app1"])
		try:
			left = scalar(other, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leftover'")
		finally:
			other.close()
		assert left == 0


def test_a_failed_transaction_mode_request_leaves_no_prepared_statement_and_waits_for_no_server(
	cluster, registry
):
	"""Item 6, found by a cold review: a request that PREPAREs, then fails. The release must run on the
	server still lent (so the server is dropped with the statement on it), and the return must not need
	another server of its site's saturated pool for psycopg2's own ROLLBACK."""
	with PgBouncer(cluster, users=USERS, pool_mode="transaction", default_pool_size=1) as bouncer:
		config = PoolConfig(enabled=True, size=1, pgbouncer_mode="transaction")
		key = key_for(bouncer=bouncer)
		conn = registry.getconn(key, config, frappe_like_factory(bouncer))
		conn.cursor().execute("PREPARE failed_leftover AS SELECT 1")
		with pytest.raises(psycopg2.errors.DivisionByZero):
			scalar(conn, "SELECT 1/0")
		# another client of the site queues for the only server: a return that needs a server again waits
		queued = bouncer.connect("app1", USERS["app1"])

		def hold_the_server():
			with contextlib.suppress(psycopg2.errors.QueryCanceled):
				scalar(queued, f"SELECT pg_sleep({HANG + 10})")  # cancelled below

		waiting = threading.Thread(target=hold_the_server, daemon=True)
		waiting.start()
		wait_for(
			lambda: int(pools(bouncer, "app1").get("cl_waiting", 0)) == 1, "a client queued in pgBouncer"
		)
		returned = threading.Thread(target=registry.putconn, args=(conn,), daemon=True)
		returned.start()
		returned.join(HANG)
		stalled = returned.is_alive()  # waiting for the server the queued client got
		if not stalled:
			# cancelled once its query runs on a server: pgBouncer drops a cancel that comes while the client
			# still waits for one, and the sleep then runs out (the thread outlived the test under load)
			wait_for(
				lambda: cluster.execute(
					"SELECT 1 FROM pg_stat_activity WHERE datname = 'app1' AND state = 'active'"
					" AND query LIKE 'SELECT pg_sleep(%'"
				),
				"the queued client's query running",
			)
		queued.cancel()
		waiting.join(HANG)
		returned.join(HANG)
		queued.rollback()
		left = scalar(queued, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'failed_leftover'")
		queued.close()
		assert left == 0
		assert registry.snapshot()["idle"] == 0  # closed inside the transaction: pgBouncer dropped the server
		assert not stalled


def test_switching_transaction_to_session_mode_in_place_never_resets_without_the_connect_settings(
	cluster, registry
):
	"""Item 5b: a connection opened in transaction mode records no connect-time settings; kept into
	session mode, its reset would undo psycopg2's SET DATESTYLE TO 'ISO' and every date read would fail
	on a database whose DateStyle is not ISO. It must be closed instead of reset."""
	db = "dmy_switch"
	if not cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)):
		cluster.create_database(db, owner="app1")
		cluster.execute(f"ALTER DATABASE {db} SET datestyle = 'SQL, DMY'")
	with PgBouncer(cluster, users=USERS) as bouncer:
		key = key_for(bouncer=bouncer)

		def connect():
			conn = psycopg2.connect(bouncer.dsn("app1", USERS["app1"], db))
			conn.set_isolation_level(ext.ISOLATION_LEVEL_REPEATABLE_READ)
			return conn

		transaction = PoolConfig(enabled=True, size=1, pgbouncer_mode="transaction")
		session = PoolConfig(enabled=True, size=1, pgbouncer_mode="session")
		conn = registry.getconn(key, transaction, connect)
		registry.putconn(conn)
		for _ in range(2):
			conn = registry.getconn(key, session, connect)
			today = scalar(conn, "SELECT current_date")  # psycopg2 parses it: ISO only
			registry.putconn(conn)
		assert today is not None


EXIT_SCRIPT = """
import psycopg2, psycopg2.extensions as ext
from frappe_pgpool.pool import PoolConfig, PoolKey, registry
def connect():
	conn = psycopg2.connect({dsn!r})
	conn.set_isolation_level(ext.ISOLATION_LEVEL_REPEATABLE_READ)
	return conn
key = PoolKey.make("exit.local", "127.0.0.1", {port}, "app1", "app1", {password!r})
config = PoolConfig(enabled=True, size=1)
conn = registry.getconn(key, config, connect)
conn.cursor().execute("SELECT 1")
registry.putconn(conn)
assert registry.pool(key, config).snapshot()["idle"] == 1
"""


def test_a_process_that_exits_leaves_pgbouncer_no_server(cluster):
	"""Item 3: at exit a process ends its kept connections as plain Frappe ends its own: pgBouncer drops
	their servers (plain Frappe leaves none idle behind a request), with no round trip waited for."""
	with PgBouncer(cluster, users=USERS) as bouncer:
		script = EXIT_SCRIPT.format(
			dsn=bouncer.dsn("app1", USERS["app1"], "app1"), port=bouncer.port, password=USERS["app1"]
		)
		done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
		assert done.returncode == 0, done.stderr
		wait_for(lambda: servers(bouncer, "app1") == 0, lambda: str(pools(bouncer, "app1")))


def test_keep_nothing_makes_a_process_close_as_plain_frappe(cluster, registry):
	"""Item 3: a process that will serve no further checkout (an RQ work-horse) keeps nothing: its
	connection is closed inside the request's transaction (no rollback, no reset), so pgBouncer drops
	the server, and nothing is sent on return."""
	with PgBouncer(cluster, users=USERS) as bouncer:
		config = PoolConfig(enabled=True, size=1)
		key = key_for(bouncer=bouncer)
		registry.keep_nothing()
		conn = registry.getconn(key, config, frappe_like_factory(bouncer))
		scalar(conn, "SELECT 1")
		before = int(bouncer.stats("app1")["total_query_count"])
		registry.putconn(conn)
		assert int(bouncer.stats("app1")["total_query_count"]) == before
		assert registry.pool(key, config).snapshot()["idle"] == 0
		wait_for(lambda: servers(bouncer, "app1") == 0, lambda: str(pools(bouncer, "app1")))


def test_a_revoked_role_stops_being_served_within_the_lifetime(cluster, registry):
	"""Item 8: ALTER ROLE ... NOLOGIN stops plain Frappe at its next request. A kept session goes on until
	its lifetime ends (db_pool_max_lifetime): then it is closed dropping its server, so the next login
	makes pgBouncer open a backend, which PostgreSQL refuses, as it refuses plain Frappe's."""
	cluster.create_role("revoked", "pw-revoked")
	cluster.execute("GRANT CONNECT ON DATABASE app1 TO revoked")
	users = {**USERS, "revoked": "pw-revoked"}
	now = [0.0]
	# pgBouncer retries a refused server login until query_wait_timeout, then closes the client
	with PgBouncer(cluster, users=users, query_wait_timeout=2) as bouncer:
		from frappe_pgpool.pool import ConnectionPool

		pool = ConnectionPool(
			"revoked", PoolConfig(enabled=True, size=1, max_lifetime=60), clock=lambda: now[0]
		)

		def connect():
			return psycopg2.connect(bouncer.dsn("revoked", "pw-revoked", "app1"))

		try:
			conn = pool.getconn(connect)
			scalar(conn, "SELECT 1")
			pool.putconn(conn)
			cluster.execute("ALTER ROLE revoked NOLOGIN")
			conn = pool.getconn(connect)  # within the lifetime: still served (the documented bound)
			scalar(conn, "SELECT 1")
			pool.putconn(conn)
			now[0] = 61.0  # past the lifetime
			# pgBouncer accepts the client from its auth_file and logs in to PostgreSQL at the first query
			conn = pool.getconn(connect)
			with pytest.raises(psycopg2.OperationalError):
				scalar(conn, "SELECT 1")
			pool.putconn(conn)
			assert 'role "revoked" is not permitted to log in' in bouncer.log.read_text()
		finally:
			pool.close()
			cluster.execute("ALTER ROLE revoked LOGIN")
			cluster.terminate_backends(usename="revoked")


@pytest.mark.parametrize(
	"statement, defines",
	[
		("SELECT set_config('app.tenant_id', '42', false)", True),
		("select 1 from x where pg_catalog.SET_CONFIG('a.b', 'c', true) is not null", True),
		("SET app.tenant_id = 42", True),
		("  set session myapp.t TO 1", True),
		('SET LOCAL "my_app".x = 1', True),
		("RESET app.tenant_id", True),
		("select Set_Config('app.x', '1', false)", True),
		("/* tenant */ SET app.x = 1", True),
		("-- tenant\nSET app.x = 1", True),
		("SELECT 1; SET app.x = 1", True),
		("SELECT 1; set local statement_timeout = 5", False),
		("set local statement_timeout = 5000", False),  # Frappe 15's own: a built-in setting
		("SET search_path TO public", False),
		("select name from `tabToDo` order by modified desc limit 20 offset 0", False),
		("start transaction", False),
		(None, False),
	],
)
def test_which_statements_may_create_a_custom_setting(statement, defines):
	"""Item 5a: what the Frappe layer's sql wrapper marks (the connection is then closed on return)."""
	from frappe_pgpool.pool.connection import may_define_custom_setting

	assert may_define_custom_setting(statement) is defines
