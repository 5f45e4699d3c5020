"""Faults: pgBouncer down, idle timeouts, leaks, exhaustion order, secrets. Real servers only."""

from __future__ import annotations

import logging
import threading

import psycopg2
import pytest

from frappe_pgpool.pool import ConnectionPool, PoolConfig, PoolKey, PoolRegistry, ProcessBudget
from frappe_pgpool.testing.cluster import PgBouncer

from .conftest import HANG, USERS, backend_pid, frappe_like_factory, key_for, scalar, wait_for


def test_pgbouncer_down_fails_fast_then_heals(cluster, registry):
	with PgBouncer(cluster, users=USERS) as bouncer:
		key = key_for(bouncer=bouncer, site="down")
		config = PoolConfig(size=2, timeout=1)
		connect = frappe_like_factory(bouncer)
		registry.putconn(registry.getconn(key, config, connect))
		bouncer.stop()
		# the idle connection is found dead without a round trip; the reconnect is refused at once
		for _ in range(5):
			with pytest.raises(psycopg2.OperationalError) as raised:
				registry.getconn(key, config, connect)
			# refused by the closed port (not a timeout, not a wait for the pool): failing fast is the
			# refusal itself; how fast is a benchmark's figure
			assert "Connection refused" in str(raised.value), raised.value
		stats = registry.pool(key, config).snapshot()
		assert stats["connect_errors"] == 5 and stats["size"] == 0  # failed connects free their slot
		assert stats["closed"] == {"dead": 1} and (stats["waits"], stats["timeouts"]) == (0, 0)
		bouncer.start()
		conn = registry.getconn(key, config, connect)
		assert scalar(conn, "SELECT 1") == 1
		registry.putconn(conn)


def test_pgbouncer_client_idle_timeout_never_reaches_a_request(cluster, registry):
	# pgBouncer 1.18 skips clients linked to a server, so in session mode an idle pooled client is
	# never timed out; transaction mode unlinks idle clients, and there the timeout does fire.
	with PgBouncer(cluster, users=USERS, client_idle_timeout=1, pool_mode="transaction") as bouncer:
		connect = frappe_like_factory(bouncer)
		# max_idle below client_idle_timeout: the pool closes it first
		below = PoolConfig(size=2, max_idle=0.5)
		key = key_for(bouncer=bouncer, site="idle-below")
		registry.putconn(registry.getconn(key, below, connect))
		# the reaper closes it once idle for max_idle: waited for as a state, not a guessed sleep
		wait_for(lambda: registry.pool(key, below).snapshot()["closed"] == {"idle": 1}, "the reaper's close")
		conn = registry.getconn(key, below, connect)
		assert scalar(conn, "SELECT 1") == 1
		registry.putconn(conn)
		assert registry.pool(key, below).snapshot()["closed"] == {"idle": 1}
		# max_idle above it (a misconfiguration): pgBouncer closes it, the liveness check notices
		above = PoolConfig(size=2, max_idle=60)
		key = key_for(bouncer=bouncer, site="idle-above")
		timeouts_so_far = bouncer.read_log().count("client_idle_timeout")
		registry.putconn(registry.getconn(key, above, connect))
		wait_for(
			lambda: bouncer.read_log().count("client_idle_timeout") > timeouts_so_far,
			"pgBouncer's client_idle_timeout",
		)
		# pgBouncer has closed the client (it lists none for app1): its socket is closed, not closing
		wait_for(lambda: not [c for c in bouncer.clients() if c["database"] == "app1"], "the client's close")
		conn = registry.getconn(key, above, connect)
		assert scalar(conn, "SELECT 1") == 1
		registry.putconn(conn)
		assert registry.pool(key, above).snapshot()["closed"] == {"dead": 1}


def test_ten_thousand_operations_with_failures_leave_nothing_in_use(bouncer, registry):
	key = key_for(bouncer=bouncer, site="soak")
	config = PoolConfig(size=2)
	connect = frappe_like_factory(bouncer)
	failures = 0
	for i in range(10_000):
		conn = registry.getconn(key, config, connect)
		try:
			if i % 10 == 0:
				raise RuntimeError("boom")
			if i % 100 == 1:
				scalar(conn, "SELECT 1/0")
		except (RuntimeError, psycopg2.Error):
			failures += 1
		finally:
			registry.putconn(conn)
	stats = registry.pool(key, config).snapshot()
	assert failures == 1100
	assert (stats["in_use"], stats["size"], stats["created"], stats["checkouts"]) == (0, 1, 1, 10_000)


def test_leak_warning_names_where_the_connection_was_taken(bouncer, caplog):
	now = [0.0]  # the pool's clock, moved by the test: `held` is out too long when it says so
	pool = ConnectionPool("site leaky.local", PoolConfig(size=3, leak_warning=0.2), clock=lambda: now[0])
	connect = frappe_like_factory(bouncer)

	def take_and_forget():
		return pool.getconn(connect)

	held = take_and_forget()
	now[0] += 0.3
	with caplog.at_level(logging.WARNING, logger="frappe_pgpool"):
		pool.putconn(pool.getconn(connect))
	(record,) = [r for r in caplog.records if "checked out for" in r.getMessage()]
	assert "leaky.local" in record.getMessage() and "take_and_forget" in record.getMessage()
	pool.putconn(held)
	pool.close()


def test_waiters_are_served_in_arrival_order(bouncer):
	pool = ConnectionPool("fifo", PoolConfig(size=1, timeout=10), budget=ProcessBudget(setting=1))
	connect = frappe_like_factory(bouncer)
	conn = pool.getconn(connect)
	order: list[int] = []

	def waiter(n: int) -> None:
		c = pool.getconn(connect)
		order.append(n)
		pool.putconn(c)

	threads = []
	for n in range(5):
		t = threading.Thread(target=waiter, args=(n,))
		t.start()
		threads.append(t)
		wait_for(lambda n=n: pool.snapshot()["waiting"] == n + 1, f"waiter {n} queued")
	pool.putconn(conn)
	for t in threads:
		t.join(HANG)
	assert order == [0, 1, 2, 3, 4]
	assert pool.snapshot()["created"] == 1
	pool.close()


def test_no_password_in_errors_logs_or_stats(cluster, bouncer, caplog):
	password = USERS["app1"]
	now = [0.0]  # the pools' clock, moved by the test: the leak warning below is logged when it says so
	registry = PoolRegistry(clock=lambda: now[0])
	key = PoolKey.make("secret.local", bouncer.host, bouncer.port, "app1", "app1", password)
	config = PoolConfig(size=1, timeout=0.2, leak_warning=0.01)
	texts = [repr(key), key.label]

	def wrong_password():
		return psycopg2.connect(bouncer.dsn("app1", password + "-wrong", "app1"))

	with caplog.at_level(logging.DEBUG, logger="frappe_pgpool"):
		with pytest.raises(psycopg2.OperationalError) as raised:
			registry.getconn(key, config, wrong_password)
		texts.append(str(raised.value))
		conn = registry.getconn(key, config, frappe_like_factory(bouncer), 1)
		failed: list[BaseException] = []

		def exhausted() -> None:  # another thread: one holding a checkout never waits (an overdraft)
			try:
				registry.getconn(key, config, frappe_like_factory(bouncer))
			except psycopg2.OperationalError as e:
				failed.append(e)

		other = threading.Thread(target=exhausted)
		other.start()
		other.join(HANG)
		texts.append(str(failed[0]))
		# a leak warning's text is checked too: a return reports the *other* connections out too long (a
		# sleep here before only returned `conn`, which reports nothing), so a nested checkout is returned
		now[0] += 0.02
		nested = registry.getconn(key, config, frappe_like_factory(bouncer))  # this thread holds one: no wait
		registry.putconn(nested)
		registry.putconn(conn)
		texts += [str(registry.pool(key, config).snapshot())]
	texts += [r.getMessage() for r in caplog.records]
	assert len(texts) > 4 and [t for t in texts if "checked out for" in t]
	assert not [t for t in texts if password in t]
	registry.close_all()


def test_a_checked_out_connection_survives_a_concurrent_pool_close(bouncer):
	pool = ConnectionPool("closing", PoolConfig(size=2))
	connect = frappe_like_factory(bouncer)
	conn = pool.getconn(connect)
	pid = backend_pid(conn)
	pool.close()
	assert scalar(conn, "SELECT pg_backend_pid()") == pid  # still usable by its holder
	pool.putconn(conn)
	assert conn.closed and pool.snapshot()["closed"] == {"pool_closed": 1}
