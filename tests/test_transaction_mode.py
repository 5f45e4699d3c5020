"""pgBouncer transaction mode (db_pool_pgbouncer_mode = "transaction"), on a real pgBouncer.

A server is lent to a client for one transaction only, so between checkouts no server session is the
pool's: the return sends only the rollback (a session reset would run on whichever server pgBouncer lends
for it, and its restored settings would stay there for other clients), and nothing is read at connect.
What the pool still owes: each checkout's transaction rolled back, after what a rollback keeps (session
advisory locks, sequence state) is undone on the server still lent, so pgBouncer gets its server back clean
instead of closing it, as it does when plain Frappe disconnects inside a transaction.
"""

from __future__ import annotations

import psycopg2
import pytest

from frappe_pgpool.pool import ConfigError, PoolConfig, parse_config
from frappe_pgpool.testing.cluster import PgBouncer

from .conftest import USERS, backend_pid, frappe_like_factory, key_for


@pytest.fixture(scope="module")
def tx_bouncer(cluster):
	with PgBouncer(cluster, users=USERS, pool_mode="transaction", default_pool_size=2) as b:
		yield b


def queries(bouncer) -> int:
	row = bouncer.stats("app1", missing_ok=True)
	return 0 if row is None else int(row["total_query_count"])  # None: no client of app1 yet, none sent


def request(conn, statement="SELECT 1"):
	"""What a Frappe request does: statements in psycopg2's transaction, left open."""
	with conn.cursor() as cur:
		cur.execute(statement)
		return cur.fetchall()


def test_the_return_releases_the_lent_server_then_rolls_back(tx_bouncer, registry):
	"""Two round trips on the server still lent for the request's transaction: what a rollback keeps is
	undone (connection.TRANSACTION_MODE_RELEASE), then the rollback; nothing at all when none is lent."""
	config = PoolConfig(enabled=True, size=2, pgbouncer_mode="transaction")
	key = key_for(bouncer=tx_bouncer)
	connect = frappe_like_factory(tx_bouncer)
	before_open = queries(tx_bouncer)
	conn = registry.getconn(key, config, connect)
	assert queries(tx_bouncer) == before_open  # nothing read at connect: no session of ours to record
	for _ in range(5):
		request(conn)
		before = queries(tx_bouncer)
		assert registry.putconn(conn)
		assert queries(tx_bouncer) - before == 2  # the release, then ROLLBACK
		conn = registry.getconn(key, config, connect)
		before = queries(tx_bouncer)
		assert registry.putconn(conn)  # returned idle: nothing at all
		assert queries(tx_bouncer) == before
		conn = registry.getconn(key, config, connect)
	registry.putconn(conn)


def test_session_mode_on_a_transaction_pooler_would_reset_a_lent_server(tx_bouncer, registry):
	"""The default (session) on a transaction-mode pgBouncer: the reset is a round trip more, sent to
	whichever server pgBouncer lends for it. doctor reports this mismatch."""
	key = key_for(bouncer=tx_bouncer)
	conn = registry.getconn(key, PoolConfig(enabled=True, size=2), frappe_like_factory(tx_bouncer))
	request(conn)
	before = queries(tx_bouncer)
	registry.putconn(conn)
	assert queries(tx_bouncer) - before == 2  # ROLLBACK, then the session reset


def test_servers_are_given_back_clean_not_closed(tx_bouncer, registry):
	"""Plain Frappe closes its connection inside a transaction: pgBouncer closes that server too, so
	every request costs a new backend. The pool rolls back, and pgBouncer keeps its servers."""
	plain = set()
	for _ in range(10):
		conn = frappe_like_factory(tx_bouncer)()
		plain.add(backend_pid(conn))  # psycopg2's BEGIN, then the query: a server is lent
		conn.close()  # inside the transaction
	config = PoolConfig(enabled=True, size=2, pgbouncer_mode="transaction")
	key = key_for(bouncer=tx_bouncer)
	pooled = set()
	for _ in range(10):
		conn = registry.getconn(key, config, frappe_like_factory(tx_bouncer))
		pooled.add(backend_pid(conn))
		registry.putconn(conn)
	print(f"\n10 requests: plain Frappe used {len(plain)} backends, the pool {len(pooled)}")
	assert len(plain) == 10  # a new backend per request
	assert len(pooled) == 1  # default_pool_size 2, one client: the same server, lent again


def test_a_request_sees_a_clean_transaction_and_its_writes_are_not_carried(cluster, tx_bouncer, registry):
	with cluster.connect(dbname="app1") as admin:
		admin.cursor().execute(
			"CREATE TABLE IF NOT EXISTS tx_mode_probe (tag text); GRANT ALL ON tx_mode_probe TO app1"
		)
	config = PoolConfig(enabled=True, size=2, pgbouncer_mode="transaction")
	key = key_for(bouncer=tx_bouncer)
	connect = frappe_like_factory(tx_bouncer)
	conn = registry.getconn(key, config, connect)
	request(conn, "INSERT INTO tx_mode_probe VALUES ('left open') RETURNING tag")
	registry.putconn(conn)  # never committed: rolled back
	conn = registry.getconn(key, config, connect)
	assert request(conn, "SELECT count(*) FROM tx_mode_probe") == [(0,)]
	assert request(conn, "SHOW transaction_isolation") == [("repeatable read",)]
	registry.putconn(conn)


@pytest.mark.parametrize("value", ["statement", "Session ", 1, True])
def test_the_mode_is_validated(value):
	if value == "Session ":
		assert parse_config({"db_pool_pgbouncer_mode": value}).pgbouncer_mode == "session"
		return
	with pytest.raises(ConfigError, match="db_pool_pgbouncer_mode"):
		parse_config({"db_pool_pgbouncer_mode": value})


def test_psycopg2_errors_are_still_the_drivers(tx_bouncer, registry):
	config = PoolConfig(enabled=True, size=2, pgbouncer_mode="transaction")
	conn = registry.getconn(key_for(bouncer=tx_bouncer), config, frappe_like_factory(tx_bouncer))
	with pytest.raises(psycopg2.errors.UndefinedTable):
		request(conn, "SELECT * FROM no_such_table")
	assert registry.putconn(conn)  # an aborted transaction is rolled back and kept
	assert registry.snapshot()["idle"] == 1
