"""Micro benchmark: what one checkout + return costs, side by side, against real pgBouncer.

    ./dev bench-micro        (or: python benchmarks/micro.py --out benchmarks/results)

Contenders: connect-per-request (SCRAM over TCP, md5 over TCP, SCRAM over the unix socket),
frappe_pgpool, psycopg2's ThreadedConnectionPool, SQLAlchemy's QueuePool with pre_ping over
psycopg2, and psycopg_pool over psycopg 3. For each: wall and CPU time per checkout+return
(p50/p95/p99, microseconds), and round trips per checkout and per return counted from pgBouncer's
SHOW STATS (query counts) around each phase. Two cases: the connection comes back idle, and it
comes back inside a transaction after one query (how Frappe returns it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2
import psycopg2.extensions as ext
import psycopg2.pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.provenance import load_average, provenance
from frappe_pgpool.pool import PoolConfig, PoolKey, PoolRegistry
from frappe_pgpool.testing.cluster import PgBouncer, PostgresCluster

USER, PASSWORD = "bench", "bench-password"
Checkout = Callable[[], object]
Return = Callable[[object], None]


def quantiles(values: list[float]) -> dict[str, float]:
	ordered = sorted(values)
	return {f"p{q}": ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] for q in (50, 95, 99)}


def contenders(
	scram: PgBouncer, md5: PgBouncer
) -> dict[str, tuple[Checkout, Return, Callable[[object], None]]]:
	"""name -> (checkout, return, run one query in the unit of work)."""
	tcp = scram.dsn(USER, PASSWORD, USER)

	def psycopg2_query(conn) -> None:
		with conn.cursor() as cur:
			cur.execute("SELECT 1")

	def frappe_connect(dsn: str) -> Callable[[], ext.connection]:
		def connect() -> ext.connection:
			conn = psycopg2.connect(dsn)
			conn.set_isolation_level(ext.ISOLATION_LEVEL_REPEATABLE_READ)
			return conn

		return connect

	registry = PoolRegistry()
	key = PoolKey.make("bench.local", scram.host, scram.port, USER, USER, PASSWORD)
	config = PoolConfig(enabled=True)
	threaded = psycopg2.pool.ThreadedConnectionPool(1, 4, tcp)
	bare_pool = registry.pool(
		PoolKey.make("bare.local", scram.host, scram.port, USER, USER, PASSWORD), config
	)

	def threaded_put(conn) -> None:
		conn.rollback()  # what any caller of ThreadedConnectionPool must do itself
		threaded.putconn(conn)

	import sqlalchemy.pool
	from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2

	qpool = sqlalchemy.pool.QueuePool(
		frappe_connect(tcp), pool_size=4, max_overflow=0, pre_ping=True, dialect=PGDialect_psycopg2()
	)

	def sqla_query(proxy) -> None:
		cur = proxy.cursor()
		cur.execute("SELECT 1")
		cur.close()

	import psycopg_pool

	ppool = psycopg_pool.ConnectionPool(
		f"host={scram.host} port={scram.port} user={USER} password={PASSWORD} dbname={USER}",
		min_size=1,
		max_size=4,
		open=True,
	)

	def psycopg3_query(conn) -> None:
		conn.execute("SELECT 1")

	socket_dsn = scram.dsn(USER, PASSWORD, USER, host=scram.socket_dir)
	plain = {
		"connect/close SCRAM TCP": frappe_connect(tcp),
		"connect/close md5 TCP": frappe_connect(md5.dsn(USER, PASSWORD, USER)),
		"connect/close SCRAM unix": frappe_connect(socket_dsn),
	}
	result = {name: (connect, lambda c: c.close(), psycopg2_query) for name, connect in plain.items()}
	result["frappe_pgpool"] = (
		lambda: registry.getconn(key, config, frappe_connect(tcp)),
		registry.putconn,
		psycopg2_query,
	)
	bare_pool.reconfigure(PoolConfig(enabled=True, reset_query=""))  # bookkeeping only: rollback, no reset
	result["frappe_pgpool, reset_query ''"] = (
		lambda: bare_pool.getconn(frappe_connect(tcp)),
		bare_pool.putconn,
		psycopg2_query,
	)
	result["psycopg2 ThreadedConnectionPool"] = (threaded.getconn, threaded_put, psycopg2_query)
	result["SQLAlchemy QueuePool pre_ping"] = (qpool.connect, lambda p: p.close(), sqla_query)
	result["psycopg_pool (psycopg 3)"] = (ppool.getconn, ppool.putconn, psycopg3_query)
	return result


def query_count(bouncer: PgBouncer) -> int:
	return int(bouncer.stats(USER)["total_query_count"])


def measure(bouncers, name, checkout, give_back, query, iterations, with_query) -> dict:
	scram = bouncers[0]
	counted = bouncers[1] if "md5" in name else scram
	# round trips per phase, counted on pgBouncer around each phase
	checkout_rt = return_rt = 0
	rt_runs = 30
	for _ in range(rt_runs):
		before = query_count(counted)
		conn = checkout()
		middle = query_count(counted)
		if with_query:
			query(conn)
		after_query = query_count(counted)
		give_back(conn)
		after = query_count(counted)
		checkout_rt += middle - before
		return_rt += after - after_query
	wall, cpu = [], []
	for _ in range(iterations):
		t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
		conn = checkout()
		if with_query:
			t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
			query(conn)
			t2, c2 = time.perf_counter_ns(), time.thread_time_ns()
		else:
			t1 = t2 = c1 = c2 = 0
		give_back(conn)
		t3, c3 = time.perf_counter_ns(), time.thread_time_ns()
		wall.append(((t3 - t0) - (t2 - t1)) / 1000)  # the query itself is not the pool's cost
		cpu.append(((c3 - c0) - (c2 - c1)) / 1000)
	return {
		"checkout_round_trips": checkout_rt / rt_runs,
		"return_round_trips": return_rt / rt_runs,
		"wall_us": quantiles(wall),
		"cpu_us": quantiles(cpu),
		"iterations": iterations,
	}


def run(out: Path, iterations: int, connect_iterations: int) -> dict:
	logging.getLogger("psycopg.pool").setLevel(logging.ERROR)  # it warns on every rollback-on-return
	results: dict[str, dict] = {}
	with PostgresCluster() as cluster:
		cluster.create_role(USER, PASSWORD)
		cluster.create_database(USER, owner=USER)
		with (
			PgBouncer(cluster, users={USER: PASSWORD}) as scram,
			PgBouncer(cluster, users={USER: PASSWORD}, auth_type="md5") as md5,
		):
			ran_on = provenance(postgres=cluster.connect, pgbouncer=scram.admin)
			print(ran_on, flush=True)
			for with_query in (False, True):
				case = "after one query (returned in a transaction)" if with_query else "returned idle"
				results[case] = {}
				for name, (checkout, give_back, query) in contenders(scram, md5).items():
					n = connect_iterations if name.startswith("connect") else iterations
					for _ in range(20):  # warm up
						conn = checkout()
						query(conn)
						give_back(conn)
					results[case][name] = measure(
						(scram, md5), name, checkout, give_back, query, n, with_query
					)
					print(f"{case:45} {name:34} {results[case][name]['wall_us']}", flush=True)
	data = {"provenance": ran_on, "load_at_end": load_average(), "cases": results}
	out.mkdir(parents=True, exist_ok=True)
	(out / "micro.json").write_text(json.dumps(data, indent=1))
	write_report(out, data)
	return results


def write_report(out: Path, data: dict) -> None:
	results = data["cases"]
	lines = [
		"# Micro benchmark: one checkout + return",
		"",
		data["provenance"],
		"",
		f"Generated by `benchmarks/micro.py`: a throwaway PostgreSQL and pgBouncer on loopback (session mode). "
		f"Load average (1/5/15 min) at the end: {data['load_at_end']} (the start's is in the line above). "
		"Times exclude the query itself. Round trips are counted by pgBouncer "
		"(SHOW STATS query counts) around each phase; a connect/close row sends no query but costs a login "
		"(SCRAM or md5) and a new Postgres backend every time.",
		"",
	]
	for case, rows in results.items():
		lines += [
			f"## Connection {case}",
			"",
			"| contender | RT checkout | RT return | wall p50 us | wall p95 | wall p99 | CPU p50 us | CPU p95 |",
			"|---|---|---|---|---|---|---|---|",
		]
		for name, r in rows.items():
			w, c = r["wall_us"], r["cpu_us"]
			lines.append(
				f"| {name} | {r['checkout_round_trips']:.2f} | {r['return_round_trips']:.2f} | {w['p50']:.1f} | "
				f"{w['p95']:.1f} | {w['p99']:.1f} | {c['p50']:.1f} | {c['p95']:.1f} |"
			)
		ours, tcp = rows["frappe_pgpool"], rows["psycopg2 ThreadedConnectionPool"]
		bare = rows["frappe_pgpool, reset_query ''"]
		lines += [
			"",
			f"frappe_pgpool / ThreadedConnectionPool CPU p50: {ours['cpu_us']['p50'] / tcp['cpu_us']['p50']:.2f}x "
			f"(with reset_query '', same round trips as ThreadedConnectionPool + rollback: "
			f"{bare['cpu_us']['p50'] / tcp['cpu_us']['p50']:.2f}x); "
			f"connect-per-request (SCRAM TCP) / frappe_pgpool wall p50: "
			f"{rows['connect/close SCRAM TCP']['wall_us']['p50'] / ours['wall_us']['p50']:.1f}x",
			"",
		]
	lines += ["![wall time p50](micro.png)", ""]
	(out / "micro.md").write_text("\n".join(lines))
	try:
		import matplotlib

		matplotlib.use("Agg")
		import matplotlib.pyplot as plt
	except ImportError:
		return
	fig, axes = plt.subplots(1, len(results), figsize=(14, 5), sharey=True)
	for ax, (case, rows) in zip(axes, results.items(), strict=True):
		names = list(rows)
		ax.barh(names, [rows[n]["wall_us"]["p50"] for n in names], label="p50")
		ax.barh(
			names,
			[rows[n]["wall_us"]["p95"] - rows[n]["wall_us"]["p50"] for n in names],
			left=[rows[n]["wall_us"]["p50"] for n in names],
			alpha=0.4,
			label="p95",
		)
		ax.set_xscale("log")
		ax.set_xlim(left=1)
		ax.set_title(f"checkout + return, {case}", fontsize=9)
		ax.set_xlabel("microseconds (log)")
		ax.legend()
	fig.tight_layout()
	fig.savefig(out / "micro.png", dpi=110)


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
	parser.add_argument("--iterations", type=int, default=3000)
	parser.add_argument("--connect-iterations", type=int, default=300)
	args = parser.parse_args()
	run(args.out, args.iterations, args.connect_iterations)
	return 0


if __name__ == "__main__":
	raise SystemExit(main())
