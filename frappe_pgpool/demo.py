"""The main job: start a throwaway PostgreSQL + pgBouncer (session mode, SCRAM) and show, side by
side in one run, what a Frappe-like unit of work costs with connect-per-request and with the pool.

    python -m frappe_pgpool.demo [--requests N]

A "request" here is what Frappe 15 does per HTTP request on its connection: open (psycopg2.connect
+ REPEATABLE READ), one query in psycopg2's implicit transaction, then close (plain) or return
(pooled: rollback + session reset).
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg2
import psycopg2.extensions as ext

from .pool import PoolConfig, PoolKey, PoolRegistry
from .testing.cluster import PgBouncer, PostgresCluster

USER, PASSWORD = "demo", "demo-password"


def percentiles(samples: list[float]) -> dict[str, float]:
	ordered = sorted(samples)

	def at(q: float) -> float:
		return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

	return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "mean": statistics.fmean(ordered) * 1000}


def run(requests: int) -> int:
	with PostgresCluster() as cluster:
		cluster.create_role(USER, PASSWORD)
		cluster.create_database(USER, owner=USER)
		with PgBouncer(cluster, users={USER: PASSWORD}) as bouncer:
			dsn = bouncer.dsn(USER, PASSWORD, USER)

			def connect() -> ext.connection:
				conn = psycopg2.connect(dsn)
				conn.set_isolation_level(ext.ISOLATION_LEVEL_REPEATABLE_READ)
				return conn

			def query(conn: ext.connection) -> None:
				# what a Frappe request does on its connection: psycopg2's BEGIN and a query, then
				# frappe.db.rollback() ("rollback" + "START TRANSACTION"), so it ends in a transaction
				with conn.cursor() as cur:
					cur.execute("SELECT 1")
					cur.fetchone()
					cur.execute("rollback")
					cur.execute("START TRANSACTION")

			registry = PoolRegistry()
			key = PoolKey.make("demo.local", bouncer.host, bouncer.port, USER, USER, PASSWORD)
			config = PoolConfig(enabled=True)

			def plain() -> None:
				conn = connect()
				query(conn)
				conn.close()

			def pooled() -> None:
				conn = registry.getconn(key, config, connect)
				query(conn)
				registry.putconn(conn)

			results = {}
			for name, fn in (("connect per request", plain), ("frappe_pgpool", pooled)):
				logins = bouncer.logins(USER)
				backends = bouncer.server_connections_opened(USER)
				fn()  # warm up: the pool's one login happens here, and is counted
				queries = bouncer.stats(USER)["total_query_count"]
				samples = []
				for _ in range(requests):
					started = time.perf_counter()
					fn()
					samples.append(time.perf_counter() - started)
				results[name] = {
					**percentiles(samples),
					"logins": bouncer.logins(USER) - logins,
					"backends": bouncer.server_connections_opened(USER) - backends,
					"queries": bouncer.stats(USER)["total_query_count"] - queries,
				}
			registry.close_all()

	print(f"{requests} Frappe-like requests through pgBouncer (session mode, SCRAM, TCP loopback)")
	print("a request: open or check out, SELECT 1, rollback, START TRANSACTION, close or return\n")
	header = (
		f"{'':22}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'logins':>9}{'new backends':>14}{'queries/req':>13}"
	)
	print(header)
	for name, r in results.items():
		print(
			f"{name:22}{r['p50']:9.3f}{r['p95']:9.3f}{r['p99']:9.3f}{r['logins']:9d}{r['backends']:14d}"
			f"{r['queries'] / requests:13.2f}"
		)
	plain_r, pooled_r = results["connect per request"], results["frappe_pgpool"]
	print(
		f"\npooled/plain p50 = {pooled_r['p50'] / plain_r['p50']:.2f}, p95 = {pooled_r['p95'] / plain_r['p95']:.2f}"
	)
	return 0


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--requests", type=int, default=1000)
	return run(parser.parse_args().requests)


if __name__ == "__main__":
	raise SystemExit(main())
