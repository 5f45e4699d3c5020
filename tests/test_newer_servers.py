"""The pool and doctor against a newer PostgreSQL than the machine's: 16.2, from PyPI.

Debian 12 ships PostgreSQL 15 and pgBouncer 1.18 and nothing newer; PyPI's pgserver wheel bundles a
relocatable PostgreSQL 16 build, which `scripts/pg-newer` unpacks (./dev exports its bin directory as
PGPOOL_PG16_BINDIR). So PostgreSQL 16's `reserved_connections`, which doctor subtracts from
max_connections, is read from a real server here, not from a row the test made up. pgBouncer 1.24's
client caps (max_db_client_connections, max_user_client_connections) are not installable on this machine
kind (neither Debian 12 nor PyPI has a pgBouncer newer than 1.18): those columns are tested on rows
shaped as pgBouncer's documentation gives them (test_operability.py), and the README's compatibility
table says so.
"""

from __future__ import annotations

import os

import psycopg2
import pytest

from frappe_pgpool import doctor
from frappe_pgpool.pool import PoolConfig, PoolRegistry
from frappe_pgpool.testing.cluster import PgBouncer, PostgresCluster

from .conftest import USERS, frappe_like_factory, key_for
from .test_operability import behind, bench_of, by_check, examine, pool_config

BINDIR = os.environ.get("PGPOOL_PG16_BINDIR")
pytestmark = pytest.mark.skipif(not BINDIR, reason="no PostgreSQL 16 (PGPOOL_PG16_BINDIR: scripts/pg-newer)")

RESERVED = 5  # reserved_connections, new in 16: for roles with pg_use_reserved_connections


@pytest.fixture(scope="module")
def pg16():
	with PostgresCluster(bindir=BINDIR, settings={"reserved_connections": RESERVED}) as c:
		for user, password in USERS.items():
			c.create_role(user, password)
			c.create_database(user, owner=user)
		yield c


@pytest.fixture(scope="module")
def bouncer16(pg16):
	with PgBouncer(pg16, users=USERS, default_pool_size=20) as b:
		yield b


def test_the_server_is_postgresql_16(pg16):
	(row,) = pg16.execute("SELECT current_setting('server_version_num')::int AS v")
	assert 160000 <= row["v"] < 170000


def test_doctor_reads_reserved_connections_from_a_real_postgresql_16(pg16):
	server = doctor.read_server(
		lambda: psycopg2.connect(
			host=pg16.host, port=pg16.port, user="app1", password=USERS["app1"], dbname="app1"
		)
	)
	assert server.version.startswith("16.")
	assert (server.reserved, server.superuser_reserved) == (RESERVED, 3)
	assert server.limit == 300 - 3 - RESERVED
	assert server.limit_text.endswith(f"- reserved_connections={RESERVED} = {300 - 3 - RESERVED}")


def test_doctors_max_connections_check_subtracts_them_through_pgbouncer(bouncer16):
	bench = bench_of(behind(bouncer16, pool_config(size=4)), web=4, threads=4, jobs=3)
	found = by_check(examine(bouncer16, bench))
	finding = found["max_connections"]
	assert finding.level == "ok" and "up to 19 backends" in finding.message
	assert f"reserved_connections={RESERVED} = {300 - 3 - RESERVED}" in finding.message


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_kept_connection_comes_back_fresh_on_postgresql_16(pg16, mode):
	"""The return's reset on 16: session settings, advisory locks, temporary tables and prepared statements
	of one checkout are gone at the next, which gets the same kept connection (one login)."""
	settings = {"pool_mode": mode} if mode == "transaction" else {}
	with PgBouncer(pg16, users=USERS, **settings) as bouncer:
		registry = PoolRegistry(reap_interval=0)
		config = PoolConfig(size=2, timeout=5, pgbouncer_mode=mode)
		key = key_for(bouncer=bouncer, site=f"pg16-{mode}.local")
		connect = frappe_like_factory(bouncer)
		try:
			conn = registry.getconn(key, config, connect)
			with conn.cursor() as cur:
				cur.execute("SELECT pg_backend_pid()")
				cur.execute("SET statement_timeout = 1234")
				cur.execute("SELECT pg_advisory_lock(42)")
				cur.execute("CREATE TEMP TABLE t16 (x int)")
			registry.putconn(conn)
			again = registry.getconn(key, config, connect)
			with again.cursor() as cur:
				cur.execute("SHOW statement_timeout")
				timeout = cur.fetchone()[0]
				cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
				locks = cur.fetchone()[0]
				cur.execute("SELECT to_regclass('pg_temp.t16') IS NULL")
				no_temp = cur.fetchone()[0]
			registry.putconn(again)
			assert again is conn and bouncer.logins("app1") == 1
			assert (timeout, locks, no_temp) == ("0", 0, True)
		finally:
			registry.close_all()
