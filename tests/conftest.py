"""Fixtures: a throwaway PostgreSQL cluster and a pgBouncer (session mode, SCRAM) per test session.

The Frappe tier (tests/frappe) may be skipped locally when there is no bench, never where
PGPOOL_REQUIRE_FRAPPE=1: there a missing bench stops the run before any test, and any skipped
Frappe-tier test (at run time or at collection) fails the run, named with its reason. Under
PGPOOL_NO_SKIPS=1 (.ci/run sets it) or CI=true any skip at all, in any tier, fails the run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

import psycopg2
import psycopg2.extensions as ext
import pytest

from frappe_pgpool.pool import PoolConfig, PoolKey, PoolRegistry
from frappe_pgpool.testing.cluster import HANG, PgBouncer, PostgresCluster, wait_for

from .frappe.bench import bench_problem

USERS = {"app1": "pw-app1", "app2": "pw-app2"}


@pytest.fixture(scope="session")
def cluster():
	with PostgresCluster() as c:
		for user, password in USERS.items():
			c.create_role(user, password)
			c.create_database(user, owner=user)
		c.create_role("other_role", "pw-other")
		with c.connect() as admin:
			admin.cursor().execute("GRANT other_role TO app1")
		yield c


@pytest.fixture(scope="session")
def bouncer(cluster):
	with PgBouncer(cluster, users=USERS) as b:
		yield b


def frappe_like_factory(
	bouncer: PgBouncer, user: str = "app1", isolation: int = ext.ISOLATION_LEVEL_REPEATABLE_READ
):
	"""What Frappe 15's PostgresDatabase.get_connection does: connect, then set the isolation level."""

	def connect() -> ext.connection:
		conn = psycopg2.connect(bouncer.dsn(user, USERS[user], user))
		conn.set_isolation_level(isolation)
		return conn

	return connect


def key_for(user: str = "app1", site: str | None = None, bouncer: PgBouncer | None = None) -> PoolKey:
	port = bouncer.port if bouncer else 0
	return PoolKey.make(site or f"{user}.local", "127.0.0.1", port, user, user, USERS[user])


@pytest.fixture
def registry():
	reg = PoolRegistry()
	yield reg
	reg.close_all()


@pytest.fixture
def config():
	return PoolConfig(enabled=True, size=4, timeout=2.0)


def backend_pid(conn: ext.connection) -> int:
	with conn.cursor() as cur:
		cur.execute("SELECT pg_backend_pid()")
		return cur.fetchone()[0]


def scalar(conn: ext.connection, sql: str, args=None):
	with conn.cursor() as cur:
		cur.execute(sql, args)
		return cur.fetchone()[0]


def completes(fn, within: float = HANG):
	"""Run fn() in a thread; return its result or raise its exception.

	A HANG detector, never a speed bound: it fails only when fn is still blocked after `within` seconds
	(the thread is left behind, a daemon). Not for pool checkouts: a checkout belongs to its thread, and a
	helper thread may reuse the ident of a finished one that held a checkout. Tests assert what happened (an order of events, a count, a
	state), never how long it took: benchmarks report durations.
	"""
	outcome: list = []

	def run() -> None:
		try:
			outcome.append((True, fn()))
		except BaseException as e:
			outcome.append((False, e))

	thread = threading.Thread(target=run, name="completes", daemon=True)
	thread.start()
	thread.join(within)
	assert not thread.is_alive(), f"{fn!r} still blocked after {within:.0f} s: a hang"
	((ok, value),) = outcome
	if not ok:
		raise value
	return value


def wait_servers_gone(cluster: PostgresCluster, bouncer: PgBouncer, pids: Iterable[int]) -> None:
	"""Until these backends have exited and pgBouncer has dropped their servers (in session mode with the
	clients they were linked to, in the same step): what a pool's next checkout can see. PostgreSQL
	dropping a backend from pg_stat_activity does not mean pgBouncer has read its end yet."""
	pids = set(pids)

	def gone() -> bool:
		# remote_pid is 0 only for a server still logging in (a missing column fails here, loudly)
		servers = {int(s["remote_pid"]) for s in bouncer.admin("SHOW SERVERS")}
		return not pids & ({b["pid"] for b in cluster.backends()} | servers)

	wait_for(
		gone,
		lambda: f"backends {sorted(pids)} still there: {cluster.backends()}, {bouncer.admin('SHOW SERVERS')}",
	)


REQUIRE_FRAPPE = os.environ.get("PGPOOL_REQUIRE_FRAPPE") == "1"
# CI (CI=true, or PGPOOL_NO_SKIPS=1 which .ci/run sets): nothing may be skipped silently, in any tier
NO_SKIPS = os.environ.get("PGPOOL_NO_SKIPS") == "1" or os.environ.get("CI") == "true"
_skips: list[tuple[str, str]] = []  # (where, why): at collection (a module-level skip) or at run time


def _reason(report) -> str:
	return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def _frappe_tier(nodeid: str) -> bool:
	return "tests/frappe/" in nodeid.replace(os.sep, "/")


def _failing_skips() -> list[str]:
	if NO_SKIPS:
		return [f"{where}: {why}" for where, why in _skips]
	if REQUIRE_FRAPPE:
		return [f"{where}: {why}" for where, why in _skips if _frappe_tier(where)]
	return []


def pytest_sessionstart(session: pytest.Session) -> None:
	problem = bench_problem()
	if REQUIRE_FRAPPE and problem:
		raise pytest.UsageError(f"PGPOOL_REQUIRE_FRAPPE=1 but the Frappe tier cannot run: {problem}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
	"""A module skipped while it is collected (pytest.skip(allow_module_level=True), importorskip)."""
	if report.skipped:
		_skips.append((f"{report.nodeid} (at collection)", _reason(report)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
	if report.skipped and not hasattr(report, "wasxfail"):
		_skips.append((report.nodeid, _reason(report)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
	if _failing_skips() and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
		session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
	if not _skips:
		return
	failing = _failing_skips()
	if failing:
		why = "PGPOOL_NO_SKIPS=1 / CI=true: nothing may be skipped" if NO_SKIPS else "PGPOOL_REQUIRE_FRAPPE=1"
		terminalreporter.write_line(f"FAILED: {len(failing)} skip(s) with {why}:", red=True)
		for line in failing:
			terminalreporter.write_line(f"  {line}", red=True)
	else:
		frappe = [w for w, _ in _skips if _frappe_tier(w)]
		terminalreporter.write_line(
			f"skipped: {len(_skips)} ({len(frappe)} in the Frappe tier): {_skips[0][0]}: {_skips[0][1]}"
		)
