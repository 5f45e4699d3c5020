"""pgBouncer transaction mode (db_pool_pgbouncer_mode = "transaction"), on a real pgBouncer.

A server is lent to a client for one transaction only, so between checkouts no server session is the
pool's: the return sends only the rollback (a session reset would run on whichever server pgBouncer lends
for it, and its restored settings would stay there for other clients), and nothing is read at connect.
What the pool still owes: each checkout's transaction rolled back, so pgBouncer gets its server back
clean instead of closing it, as it does when plain Frappe disconnects inside a transaction.
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
	return int(bouncer.stats("app1")["total_query_count"])


def request(conn, statement="SELECT 1"):
	"""What a Frappe request does: statements in psycopg2's transaction, left open."""
	with conn.cursor() as cur:
		cur.execute(statement)
		return cur.fetchall()


def test_the_return_sends_only_the_rollback(tx_bouncer, registry):
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
		assert queries(tx_bouncer) - before == 1  # ROLLBACK only
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
	assert registry.snapshot()["transaction_mode_idle"] == 1  # counted apart: it pins no server


def _site_keys(bouncer, n: int, prefix: str) -> list:
	return [key_for("app1", f"{prefix}-{i}.local", bouncer) for i in range(n)]


def test_many_sites_keep_an_idle_client_each_and_pin_no_server(tx_bouncer, registry):
	"""A sync worker serving 10 sites in turn (issue 12): in session mode it keeps one connection (each
	pins a server); in transaction mode an idle client pins nothing, so each site keeps one, and every
	checkout after the first round hits, while pgBouncer lends the same one server for all of them."""
	config = PoolConfig(enabled=True, size=2, pgbouncer_mode="transaction")
	keys = _site_keys(tx_bouncer, 10, "tx-many")
	servers = set()
	for _ in range(3):
		for key in keys:
			conn = registry.getconn(key, config, frappe_like_factory(tx_bouncer))
			servers.add(backend_pid(conn))
			registry.putconn(conn)
	pools = registry.pools()
	assert sum(pools[k].snapshot()["misses"] for k in keys) == 10  # one login per site
	assert sum(pools[k].snapshot()["hits"] for k in keys) == 20
	snap = registry.snapshot()
	assert snap["transaction_mode_idle"] == 10 and snap["transaction_mode_limit"] is None
	assert snap["open"] == 0  # nothing counted against the server budget
	assert len(servers) == 1  # one request at a time: one server, lent to each client in turn


def test_a_login_refused_for_max_client_conn_sheds_the_idle_clients_and_retries(cluster, registry, caplog):
	"""With idle clients kept per site, a pgBouncer whose max_client_conn is too small for the bench
	refuses a login: the process closes its idle clients, logs what to raise, retries the login once
	(the request is served), and from then on keeps no more than its peak, as in session mode."""
	config = PoolConfig(enabled=True, size=2, pgbouncer_mode="transaction")
	with PgBouncer(
		cluster, users=USERS, pool_mode="transaction", default_pool_size=2, max_client_conn=4
	) as b:
		keys = _site_keys(b, 8, "tx-refused")
		for key in keys:  # the 5th login is refused: 4 idle clients are held
			conn = registry.getconn(key, config, frappe_like_factory(b))
			request(conn)
			registry.putconn(conn)
		snap = registry.snapshot()
		assert snap["client_limit_refusals"] == 1
		assert snap["transaction_mode_limit"] == 1  # capped at the peak from then on
		assert snap["transaction_mode_idle"] == 1
		warnings = [r.getMessage() for r in caplog.records if "client limit" in r.getMessage()]
		assert len(warnings) == 1 and "max_client_conn" in warnings[0]
		assert "tx-refused" in warnings[0] and USERS["app1"] not in warnings[0]
