"""A pooled connection that died while idle is never handed out, and checkout costs no round trip."""

from __future__ import annotations

import select
import signal

import psycopg2
import pytest

from .conftest import HANG, backend_pid, frappe_like_factory, key_for, scalar, wait_servers_gone


@pytest.fixture
def pooled(bouncer, registry, config):
	"""(checkout, checkin) for app1 through pgBouncer, with one warm idle connection."""
	connect = frappe_like_factory(bouncer)
	key = key_for(bouncer=bouncer, site="liveness")

	def checkout():
		return registry.getconn(key, config, connect)

	conn = checkout()
	scalar(conn, "SELECT 1")
	registry.putconn(conn)
	return checkout, registry.putconn, registry.pool(key, config)


def assert_next_checkout_is_healthy(checkout, checkin, pool, old_pid):
	conn = checkout()
	try:
		assert scalar(conn, "SELECT 1") == 1  # the first statement succeeds: no error reached the user
		assert backend_pid(conn) != old_pid
	finally:
		checkin(conn)
	assert pool.snapshot()["closed"].get("dead", 0) >= 1


def test_terminated_backend_is_not_handed_out(pooled, cluster, bouncer):
	checkout, checkin, pool = pooled
	conn = checkout()
	pid = backend_pid(conn)
	checkin(conn)
	with cluster.connect() as admin, admin.cursor() as cur:
		cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
	# gone from PostgreSQL and from pgBouncer, which then closed the pooled client (its end is what the
	# checkout can see; before pgBouncer reads the backend's end, nothing on the client side shows it)
	wait_servers_gone(cluster, bouncer, [pid])
	assert_next_checkout_is_healthy(checkout, checkin, pool, pid)


def test_pgbouncer_admin_kill_is_survived(pooled, bouncer):
	checkout, checkin, pool = pooled
	conn = checkout()
	pid = backend_pid(conn)
	checkin(conn)
	bouncer.admin("KILL app1")
	bouncer.admin("RESUME app1")
	assert_next_checkout_is_healthy(checkout, checkin, pool, pid)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_pgbouncer_restart_is_survived(pooled, bouncer, sig):
	checkout, checkin, pool = pooled
	conn = checkout()
	pid = backend_pid(conn)
	checkin(conn)
	bouncer.restart(sig)
	assert_next_checkout_is_healthy(checkout, checkin, pool, pid)


def test_postgres_restart_behind_pgbouncer_is_survived(pooled, cluster):
	checkout, checkin, pool = pooled
	conn = checkout()
	pid = backend_pid(conn)
	checkin(conn)
	cluster.restart()
	assert_next_checkout_is_healthy(checkout, checkin, pool, pid)


def test_listen_notifications_are_not_mistaken_for_a_dead_connection(pooled, bouncer):
	checkout, checkin, _pool = pooled
	conn = checkout()
	pid = backend_pid(conn)
	conn.rollback()
	conn.autocommit = True
	with conn.cursor() as cur:
		cur.execute("LISTEN wake")
	conn.autocommit = False
	# a notification sent while the connection is checked out arrives on its socket
	other = psycopg2.connect(bouncer.dsn("app1", "pw-app1", "app1"))
	other.autocommit = True
	other.cursor().execute("NOTIFY wake, 'x'")
	other.close()
	# the notification is on the socket, unread, before the return (seen, not slept for): the case tested
	assert select.select([conn], [], [], HANG)[0], "the notification never arrived"
	checkin(conn)  # the reset UNLISTENs; a racing notification may still be buffered
	conn = checkout()
	assert backend_pid(conn) == pid
	assert conn.notifies == []
	checkin(conn)


def test_checkout_sends_nothing_to_the_server(pooled, bouncer):
	checkout, checkin, _pool = pooled
	before = bouncer.stats("app1")["total_query_count"]
	for _ in range(100):
		checkin(checkout())  # returned idle: no rollback needed, only the reset round trip
	after = bouncer.stats("app1")["total_query_count"]
	# one reset query string per return, none per checkout
	assert after - before == 100


def test_return_after_a_frappe_like_request_costs_rollback_plus_discard(pooled, bouncer):
	checkout, checkin, _pool = pooled
	conn = checkout()
	scalar(conn, "SELECT 1")  # psycopg2's BEGIN + the query
	with conn.cursor() as cur:
		cur.execute("rollback")  # what frappe.db.rollback() sends...
		cur.execute("START TRANSACTION")  # ...and frappe.db.begin(): destroy() finds it open
	before = int(bouncer.stats("app1")["total_query_count"])
	checkin(conn)
	# no wait: pgBouncer counts a query as it reads it, before the reply the return waited for
	assert int(bouncer.stats("app1")["total_query_count"]) - before == 2  # ROLLBACK, DISCARD ALL
	conn = checkout()
	# psycopg2 forgot the old transaction: the next statement runs in a fresh REPEATABLE READ one
	assert scalar(conn, "SHOW transaction_isolation") == "repeatable read"
	checkin(conn)
