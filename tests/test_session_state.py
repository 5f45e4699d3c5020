"""What a request leaves on a connection never reaches the next checkout (issue 11, items 2, 3, 6).

- Settings made when the connection was opened (psycopg2's own `SET DATESTYLE TO 'ISO'`, the startup
  parameters pgBouncer applies with SET) survive the reset, while a request's own SETs do not.
- psycopg2's client-side state (encoding, cursor_factory, typecasters, notices) is put back or the
  connection retired, without a round trip.
- A cursor kept after the return raises InterfaceError, as it does in plain Frappe (whose connection
  was closed), and nothing of it reaches the next holder's transaction.

Real PostgreSQL, real pgBouncer; round trips counted on pgBouncer (SHOW STATS).
"""

from __future__ import annotations

import collections
import datetime

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import pytest

from frappe_pgpool.pool import ConnectionPool, PoolConfig

from .conftest import USERS, backend_pid, scalar

DB = "tz_dmy"
APP_NAME = "frappe:tz.local:4242"
REPORTED = ("DateStyle", "TimeZone", "application_name", "client_encoding", "standard_conforming_strings")


@pytest.fixture(scope="module")
def tz_db(cluster):
	"""A database whose defaults are not psycopg2's: DateStyle SQL, DMY and a non-UTC time zone."""
	if not cluster.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)):
		cluster.create_database(DB, owner="app1")
		cluster.execute(f"ALTER DATABASE {DB} SET datestyle = 'SQL, DMY'")
		cluster.execute(f"ALTER DATABASE {DB} SET timezone = 'Asia/Kolkata'")
		cluster.execute("CREATE TABLE marks (who text)", dbname=DB)
		cluster.execute("ALTER TABLE marks OWNER TO app1", dbname=DB)
	return DB


def dsn(route: str, cluster, bouncer, **extra) -> str:
	if route == "bouncer":
		return bouncer.dsn("app1", USERS["app1"], DB, application_name=APP_NAME, **extra)
	parts = {"host": cluster.host, "port": cluster.port, "user": "app1", "dbname": DB}
	parts.update(application_name=APP_NAME, **extra)
	return " ".join(f"{k}='{v}'" for k, v in parts.items())


def factory(route: str, cluster, bouncer, **extra):
	"""Frappe 15's get_connection: connect, then REPEATABLE READ."""

	def connect() -> ext.connection:
		conn = psycopg2.connect(dsn(route, cluster, bouncer, **extra))
		conn.set_isolation_level(ext.ISOLATION_LEVEL_REPEATABLE_READ)
		return conn

	return connect


@pytest.fixture
def pool(tz_db, cluster):
	p = ConnectionPool("session-state", PoolConfig(enabled=True, size=1, timeout=2.0))
	yield p
	p.close()
	cluster.terminate_backends(usename="app1", dbname=DB)  # a failed test's connection and its locks


def settings(conn: ext.connection) -> dict[str, str]:
	with conn.cursor() as cur:
		cur.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(REPORTED),))
		return dict(cur.fetchall())


def queries(bouncer) -> int:
	"""pgBouncer's count of queries on DB. Exact with no wait: it counts a query as it reads it from the
	client, before it relays the reply the client waited for, and SHOW STATS totals are live."""
	return int(bouncer.stats(DB)["total_query_count"])


def frappe_like_request(conn: ext.connection, *statements: str) -> None:
	"""Statements committed, then a transaction left open, as Frappe returns every connection."""
	with conn.cursor() as cur:
		for statement in statements:
			cur.execute(statement)
	conn.commit()
	with conn.cursor() as cur:
		cur.execute("SELECT 1")


# -- item 2: connect-time settings survive the reset, a request's own do not --------------------


@pytest.mark.parametrize("route", ["bouncer", "direct"])
def test_connect_time_settings_survive_the_reset(route, tz_db, cluster, bouncer, pool):
	connect = factory(route, cluster, bouncer)
	conn = pool.getconn(connect)
	pid = backend_pid(conn)
	at_connect = settings(conn)
	assert at_connect["DateStyle"].startswith("ISO")  # psycopg2 SET it: it parses only ISO dates
	assert at_connect["TimeZone"] == "Asia/Kolkata"  # the database's own default
	assert at_connect["application_name"] == APP_NAME
	pool.putconn(conn)  # returned idle, nothing changed

	conn = pool.getconn(connect)
	assert backend_pid(conn) == pid
	assert settings(conn) == at_connect
	assert scalar(conn, "SELECT date '2024-03-01'") == datetime.date(2024, 3, 1)
	frappe_like_request(
		conn,
		"SET datestyle = 'German'",
		"SET timezone = 'UTC'",
		"SET application_name = 'someone else'",
		"SET standard_conforming_strings = off",
	)
	pool.putconn(conn)

	conn = pool.getconn(connect)
	assert backend_pid(conn) == pid  # the same connection, reset, not a new one
	assert settings(conn) == at_connect  # the request's SETs are gone, the connect-time ones back
	assert scalar(conn, "SELECT date '2024-03-01'") == datetime.date(2024, 3, 1)
	stamp = scalar(conn, "SELECT timestamptz '2024-03-01 12:00:00+00'")
	assert stamp.utcoffset() == datetime.timedelta(hours=5, minutes=30)
	pool.putconn(conn)


@pytest.mark.parametrize("route", ["bouncer", "direct"])
def test_startup_parameters_survive_the_reset(route, tz_db, cluster, bouncer, pool, monkeypatch):
	"""client_encoding and PGTZ are startup parameters; pgBouncer applies them with SET."""
	monkeypatch.setenv("PGTZ", "Europe/Paris")
	connect = factory(route, cluster, bouncer, client_encoding="LATIN1")
	conn = pool.getconn(connect)
	pid = backend_pid(conn)
	at_connect = settings(conn)
	assert (at_connect["TimeZone"], at_connect["client_encoding"]) == ("Europe/Paris", "LATIN1")
	frappe_like_request(conn, "SET timezone = 'UTC'", "SET client_encoding = 'UTF8'")
	pool.putconn(conn)

	conn = pool.getconn(connect)
	assert backend_pid(conn) == pid
	assert settings(conn) == at_connect
	assert conn.encoding == "LATIN1"
	assert scalar(conn, "SELECT %s::text", ("café",)) == "café"
	pool.putconn(conn)


# -- item 3: psycopg2's client-side state ------------------------------------------------------


def test_set_client_encoding_does_not_leak(tz_db, cluster, bouncer, pool):
	connect = factory("bouncer", cluster, bouncer)
	conn = pool.getconn(connect)
	conn.set_client_encoding("LATIN1")
	pool.putconn(conn)  # putting psycopg2's encoding back would cost a SET: closed instead
	assert pool.snapshot()["closed"] == {"client_encoding": 1}
	conn = pool.getconn(connect)
	assert conn.encoding == "UTF8"
	assert scalar(conn, "SHOW client_encoding") == "UTF8"
	assert scalar(conn, "SELECT %s::text", ("café €",)) == "café €"
	pool.putconn(conn)


def test_cursor_factory_does_not_leak(tz_db, cluster, bouncer, pool):
	connect = factory("bouncer", cluster, bouncer)
	conn = pool.getconn(connect)
	pid = backend_pid(conn)
	conn.cursor_factory = psycopg2.extras.RealDictCursor
	pool.putconn(conn)
	conn = pool.getconn(connect)
	assert backend_pid(conn) == pid
	with conn.cursor() as cur:
		assert not isinstance(cur, psycopg2.extras.RealDictCursor)
		cur.execute("SELECT 1 AS one")
		assert cur.fetchone() == (1,)
	pool.putconn(conn)


def test_per_connection_typecasters_do_not_leak(tz_db, cluster, bouncer, pool):
	connect = factory("bouncer", cluster, bouncer)
	conn = pool.getconn(connect)
	pid = backend_pid(conn)
	shout = ext.new_type((25,), "SHOUT", lambda value, cur: None if value is None else value.upper())
	ext.register_type(shout, conn)
	psycopg2.extras.register_uuid(conn_or_curs=conn)
	conn.binary_types[25] = shout  # psycopg2 keeps it on the connection too
	assert scalar(conn, "SELECT 'abc'::text") == "ABC"
	pool.putconn(conn)
	conn = pool.getconn(connect)
	assert backend_pid(conn) == pid
	assert scalar(conn, "SELECT 'abc'::text") == "abc"
	assert isinstance(scalar(conn, "SELECT gen_random_uuid()"), str)
	assert (conn.string_types, conn.binary_types) == ({}, {})
	pool.putconn(conn)


def test_replaced_notices_and_notifies_do_not_leak(tz_db, cluster, bouncer, pool):
	connect = factory("bouncer", cluster, bouncer)
	conn = pool.getconn(connect)
	pid = backend_pid(conn)
	mine_notices = conn.notices = collections.deque(maxlen=10)
	mine_notifies = conn.notifies = collections.deque(maxlen=10)
	pool.putconn(conn)
	conn = pool.getconn(connect)
	assert backend_pid(conn) == pid
	with conn.cursor() as cur:
		cur.execute("DO $$ BEGIN RAISE NOTICE 'for the second holder'; END $$")
		cur.execute("LISTEN wake; NOTIFY wake, 'second'")
	conn.commit()
	assert len(mine_notices) == 0 and len(mine_notifies) == 0
	assert isinstance(conn.notices, list) and isinstance(conn.notifies, list)
	assert any("second holder" in n for n in conn.notices)
	pool.putconn(conn)


# -- item 6: use after return ------------------------------------------------------------------


def marks(cluster) -> list[str]:
	return sorted(r["who"] for r in cluster.execute("SELECT who FROM marks", dbname=DB))


@pytest.fixture
def clean_marks(tz_db, cluster):
	cluster.execute("DELETE FROM marks", dbname=DB)


def test_a_cursor_kept_after_the_return_raises_and_sends_nothing(clean_marks, cluster, bouncer, pool):
	connect = factory("bouncer", cluster, bouncer)
	conn = pool.getconn(connect)
	pid = backend_pid(conn)
	kept = conn.cursor()
	kept.execute("SELECT 1")
	pool.putconn(conn)  # the holder is done, but still has `kept`

	second = pool.getconn(connect)
	assert second is conn and backend_pid(second) == pid  # same physical connection
	with second.cursor() as cur:
		cur.execute("INSERT INTO marks VALUES ('second')")
	before = queries(bouncer)
	with pytest.raises(psycopg2.InterfaceError):
		kept.execute("INSERT INTO marks VALUES ('late')")
	with pytest.raises(psycopg2.InterfaceError):
		kept.fetchone()
	assert queries(bouncer) == before  # nothing was sent
	second.commit()
	assert marks(cluster) == ["second"]
	pool.putconn(second)


@pytest.mark.parametrize("withhold", [False, True], ids=["named", "named-with-hold"])
def test_a_named_cursor_kept_after_the_return_raises_and_sends_nothing(
	withhold, clean_marks, cluster, bouncer, pool
):
	connect = factory("bouncer", cluster, bouncer)
	conn = pool.getconn(connect)
	kept = conn.cursor("kept", withhold=withhold)
	if withhold:
		kept.execute("SELECT generate_series(1, 10)")
		conn.commit()
		assert kept.fetchone() == (1,)
	pool.putconn(conn)  # returned idle, with the named cursor still open: closed, not reused
	assert pool.snapshot()["closed"] == {"named_cursor": 1}

	second = pool.getconn(connect)
	with second.cursor() as cur:
		cur.execute("INSERT INTO marks VALUES ('second')")
	before = queries(bouncer)
	with pytest.raises(psycopg2.InterfaceError):
		if withhold:
			kept.fetchone()
		else:
			kept.execute("SELECT 1")
	assert queries(bouncer) == before
	second.commit()
	assert marks(cluster) == ["second"]
	pool.putconn(second)


# -- cost: the return path keeps its round trips -----------------------------------------------


def test_return_round_trips(tz_db, cluster, bouncer, pool):
	connect = factory("bouncer", cluster, bouncer)
	conn = pool.getconn(connect)
	pool.putconn(conn)
	for _ in range(3):
		before = queries(bouncer)
		conn = pool.getconn(connect)
		assert queries(bouncer) == before  # checkout: nothing
		with conn.cursor() as cur:
			cur.execute("SET timezone = 'UTC'")
		conn.commit()  # returned idle
		middle = queries(bouncer)
		pool.putconn(conn)
		assert queries(bouncer) - middle == 1  # the reset

		conn = pool.getconn(connect)
		frappe_like_request(conn, "SET datestyle = 'German'")
		middle = queries(bouncer)
		pool.putconn(conn)
		assert queries(bouncer) - middle == 2  # ROLLBACK, the reset
	assert pool.snapshot()["created"] == 1


def test_an_empty_reset_query_sends_nothing_but_still_closes_cursors(clean_marks, cluster, bouncer, pool):
	pool.reconfigure(PoolConfig(enabled=True, size=1, reset_query=""))
	connect = factory("bouncer", cluster, bouncer)
	conn = pool.getconn(connect)
	conn.commit()
	kept = conn.cursor()
	before = queries(bouncer)
	pool.putconn(conn)
	assert queries(bouncer) == before
	second = pool.getconn(connect)
	assert second is conn
	with pytest.raises(psycopg2.InterfaceError):
		kept.execute("INSERT INTO marks VALUES ('late')")
	pool.putconn(second)
