"""How long the pool's bounded waits and fault paths take: the durations the tests no longer assert.

    python benchmarks/fault_timings.py [--runs 5]

The tests assert what happens (a PoolTimeout after a counted wait, a refusal, PAUSE completing, a
checkout that is a hit on a stalled link); this prints how long each took on this machine, on a
throwaway PostgreSQL and pgBouncer, median and max over --runs:

- exhaustion: a checkout on a full pool until PoolTimeout (db_pool_timeout 0.3 s)
- refused: a checkout while pgBouncer is down (the idle connection found dead, the reconnect refused)
- stall, hit: a checkout of the idle connection over a stalled link
- stall, waiter: a second checkout on that full pool until PoolTimeout (db_pool_timeout 0.5 s)
- stall, connect: a new connection through the stalled link until connect_timeout (2 s)
- pause, quiet: PAUSE of a pgBouncer whose only clients are idle pooled connections (max_idle 1 s)
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg2

from frappe_pgpool.pool import ConnectionPool, PoolConfig, PoolKey, PoolRegistry, PoolTimeout
from frappe_pgpool.testing.cluster import PgBouncer, PostgresCluster
from frappe_pgpool.testing.proxy import StallingProxy

USERS = {"app1": "pw-app1"}


def timed(fn, expect: type[BaseException] | None = None) -> float:
	started = time.monotonic()
	try:
		fn()
	except BaseException as e:
		if expect is None or not isinstance(e, expect):
			raise
	else:
		assert expect is None, f"expected {expect.__name__}"
	return time.monotonic() - started


def factory(bouncer: PgBouncer, **extra):
	return lambda: psycopg2.connect(bouncer.dsn("app1", USERS["app1"], "app1", **extra))


def key(bouncer: PgBouncer, site: str) -> PoolKey:
	return PoolKey.make(site, "127.0.0.1", bouncer.port, "app1", "app1", USERS["app1"])


def one_run(cluster: PostgresCluster, n: int) -> dict[str, float]:
	out: dict[str, float] = {}
	with PgBouncer(cluster, users=USERS) as bouncer:
		pool = ConnectionPool(f"site exhausted-{n}", PoolConfig(size=1, timeout=0.3))
		held = pool.getconn(factory(bouncer))
		out["exhaustion"] = timed(lambda: pool.getconn(factory(bouncer)), PoolTimeout)
		pool.putconn(held)
		pool.close()

		registry = PoolRegistry()
		try:
			k, config = key(bouncer, f"down-{n}"), PoolConfig(size=2, timeout=1)
			registry.putconn(registry.getconn(k, config, factory(bouncer)))
			bouncer.stop()
			out["refused"] = timed(
				lambda: registry.getconn(k, config, factory(bouncer)), psycopg2.OperationalError
			)
			bouncer.start()

			with StallingProxy(bouncer.host, bouncer.port) as proxy:
				k, config = key(bouncer, f"stall-{n}"), PoolConfig(size=1, timeout=0.5)

				def connect():
					return psycopg2.connect(
						bouncer.dsn("app1", USERS["app1"], "app1", port=proxy.port, connect_timeout=2)
					)

				registry.putconn(registry.getconn(k, config, connect))
				proxy.stall()
				got: list = []
				out["stall, hit"] = timed(lambda: got.append(registry.getconn(k, config, connect)))
				out["stall, waiter"] = timed(lambda: registry.getconn(k, config, connect), PoolTimeout)
				registry.putconn(got[0], discard=True)
				out["stall, connect"] = timed(
					lambda: registry.getconn(k, config, connect), psycopg2.OperationalError
				)
				proxy.resume()
			k, config = key(bouncer, f"quiet-{n}"), PoolConfig(size=2, max_idle=1.0)
			conns = [registry.getconn(k, config, factory(bouncer)) for _ in range(2)]
			for conn in conns:
				registry.putconn(conn)
			out["pause, quiet"] = timed(lambda: bouncer.admin("PAUSE app1"))
			bouncer.admin("RESUME app1")
		finally:
			registry.close_all()
	return out


def main() -> None:
	parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
	parser.add_argument("--runs", type=int, default=5)
	args = parser.parse_args()
	runs: list[dict[str, float]] = []
	with PostgresCluster() as cluster:
		for user, password in USERS.items():
			cluster.create_role(user, password)
			cluster.create_database(user, owner=user)
		for n in range(args.runs):
			runs.append(one_run(cluster, n))
	print(f"{'path':18} {'median s':>9} {'max s':>7}  ({args.runs} runs)")
	for name in runs[0]:
		values = [r[name] for r in runs]
		print(f"{name:18} {statistics.median(values):9.3f} {max(values):7.3f}")


if __name__ == "__main__":
	main()
