"""What a client's application_name costs behind pgBouncer: the SETs pgBouncer sends to its servers.

    python benchmarks/application_name.py [--transactions 2000] [--logins 400] [--rounds 3]

pgBouncer tracks application_name (with client_encoding, DateStyle, TimeZone, standard_conforming_strings)
and applies the client's value to the server it lends with a SET whenever the server's differs: behind
transaction mode before a transaction lent to another client than the server's last, behind session mode
at each client login. Four clients with one name each (as frappe:<site>:<pid> names gave each worker),
against four clients with none (plain Frappe): transactions round robin over the clients in transaction
mode, one-statement logins in session mode. On a throwaway PostgreSQL and pgBouncer (SCRAM, default_pool_size 2),
both local: times per operation as this Python client sees it, without and with names alternating, medians
of the rounds; then the SETs counted over 100 more operations each with log_statement = all. What it cannot see: the server CPU of each
SET under load, or a network between pgBouncer and PostgreSQL (here loopback: a real one adds its round trip).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from frappe_pgpool.testing.cluster import PgBouncer, PostgresCluster  # noqa: E402

USER, PASSWORD = "appname", "appname-pw"


def names(named: bool) -> list[dict]:
	return [{"application_name": f"frappe:site.local:{1000 + i}"} if named else {} for i in range(4)]


def sets(cluster: PostgresCluster) -> int:
	return cluster.log.read_text(errors="replace").count("SET application_name")


def count_sets(cluster: PostgresCluster, bouncer: PgBouncer, run, named: bool, n: int) -> int:
	"""SETs of application_name the server ran for n operations (log_statement on only for this count)."""
	cluster.execute("ALTER SYSTEM SET log_statement = 'all'")
	cluster.execute("SELECT pg_reload_conf()")
	try:
		before = sets(cluster)
		run(bouncer, named, n)
		time.sleep(0.5)  # the log catches up
		return sets(cluster) - before
	finally:
		cluster.execute("ALTER SYSTEM RESET log_statement")
		cluster.execute("SELECT pg_reload_conf()")


def transactions(bouncer: PgBouncer, named: bool, n: int) -> float:
	conns = [psycopg2.connect(bouncer.dsn(USER, PASSWORD, USER, **kw)) for kw in names(named)]
	try:
		started = time.perf_counter()
		for i in range(n):
			conn = conns[i % 4]
			with conn.cursor() as cur:
				cur.execute("SELECT 1")
			conn.commit()
		return (time.perf_counter() - started) * 1000 / n
	finally:
		for conn in conns:
			conn.close()


def logins(bouncer: PgBouncer, named: bool, n: int) -> float:
	options = names(named)
	started = time.perf_counter()
	for i in range(n):
		conn = psycopg2.connect(bouncer.dsn(USER, PASSWORD, USER, **options[i % 4]))
		with conn.cursor() as cur:
			cur.execute("SELECT 1")
		conn.close()
	return (time.perf_counter() - started) * 1000 / n


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--transactions", type=int, default=2000)
	parser.add_argument("--logins", type=int, default=400)
	parser.add_argument("--rounds", type=int, default=3)
	args = parser.parse_args()
	with PostgresCluster() as cluster:
		cluster.create_role(USER, PASSWORD)
		cluster.create_database(USER, USER)
		for mode, run, n in (
			("transaction", transactions, args.transactions),
			("session", logins, args.logins),
		):
			bouncer = PgBouncer(cluster, {USER: PASSWORD}, pool_mode=mode, default_pool_size=2).start()
			try:
				ms: dict[bool, list[float]] = {False: [], True: []}
				for round_ in range(args.rounds):
					for named in (False, True) if round_ % 2 == 0 else (True, False):
						ms[named].append(run(bouncer, named, n))
				counted = {named: count_sets(cluster, bouncer, run, named, 100) for named in (False, True)}
				unit = "transaction" if mode == "transaction" else "login"
				off, on = statistics.median(ms[False]), statistics.median(ms[True])
				print(
					f"{mode} mode, {args.rounds} x {n} {unit}s over 4 clients: no name {off:.3f} ms/{unit}, "
					f"a name per client {on:.3f} ms/{unit} (x{on / off:.2f}, {on - off:+.3f} ms); SETs pgBouncer "
					f"sent for 100 {unit}s: {counted[False]} without names, {counted[True]} with"
				)
			finally:
				bouncer.kill()
	return 0


if __name__ == "__main__":
	sys.exit(main())
