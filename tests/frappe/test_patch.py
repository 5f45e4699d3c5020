"""The patch against real Frappe: idempotent install/uninstall in every order, and the wrapped methods."""

from __future__ import annotations

import itertools
import subprocess
import textwrap

import pytest

from .bench import requires_bench, run_in_bench

pytestmark = [pytest.mark.frappe, requires_bench]

STEPS = ["install", "install", "uninstall", "uninstall"]


def test_install_uninstall_are_idempotent_in_every_order():
	orders = sorted(set(itertools.permutations(STEPS)))
	(results,) = run_in_bench(
		f"""
		import frappe_pgpool.patch as patch
		from frappe.database.postgres.database import PostgresDatabase
		from frappe.database.database import Database
		from frappe_pgpool import frappe_layer
		import psycopg2
		originals = (PostgresDatabase.__dict__["get_connection"].__wrapped__, Database.__dict__["close"].__wrapped__)
		original_connect = psycopg2.connect.__wrapped__
		patch.uninstall()
		assert PostgresDatabase.__dict__["get_connection"] is originals[0]
		assert psycopg2.connect is original_connect
		results = []
		for order in {orders!r}:
			installed = False
			for step in order:
				getattr(patch, step)()
				installed = step == "install"
				assert patch.is_installed() == installed, (order, step)
				wrapped = PostgresDatabase.__dict__["get_connection"]
				if installed:
					assert wrapped.__wrapped__ is originals[0] and wrapped._self_wrapper is frappe_layer.get_connection
					assert Database.__dict__["close"].__wrapped__ is originals[1]
					assert psycopg2.connect._self_wrapper is frappe_layer.psycopg2_connect
					assert psycopg2.connect.__wrapped__ is original_connect
				else:
					assert wrapped is originals[0] and Database.__dict__["close"] is originals[1]
					assert psycopg2.connect is original_connect
			patch.uninstall()
			results.append(order)
		out(len(results))
		"""
	)
	assert results == len(orders)


@pytest.mark.parametrize("first", ["frappe_pgpool", "frappe"])
def test_the_patch_is_armed_whichever_is_imported_first(first):
	(installed,) = run_in_bench(
		f"""
		import {first}
		import frappe_pgpool, frappe
		import frappe.database.postgres.database
		import frappe_pgpool.patch as patch
		out(patch.is_installed())
		"""
	)
	assert installed is True


def test_wrapping_on_top_of_ours_then_uninstalling_leaves_a_pass_through():
	(result,) = run_in_bench(
		"""
		import wrapt
		import frappe_pgpool.patch as patch
		from frappe.database.postgres.database import PostgresDatabase
		patch.install()
		calls = []
		def outer(wrapped, instance, args, kwargs):
			calls.append(1)
			return wrapped(*args, **kwargs)
		wrapt.wrap_function_wrapper(PostgresDatabase, "get_connection", outer)
		patch.uninstall()
		state = patch.is_installed()
		patch.install()
		out([state, patch.is_installed()])
		"""
	)
	assert result == [False, True]


# -- patch()/unpatch() in the manner of ddtrace / OpenTelemetry instrumentations: each case in a fresh
# bench Python. FRAPPE_PGPOOL_DISABLE_PATCH=1 keeps the start-time arming out, so the test drives it.
NOT_ARMED = {"FRAPPE_PGPOOL_DISABLE_PATCH": "1"}

LAYERS = """
import psycopg2
from frappe.database.postgres.database import PostgresDatabase
from frappe.database.database import Database
import frappe.database as frappe_database
from frappe_pgpool import frappe_layer, site_lifecycle
def ours(cls, attr, wrapper):
	n, current = 0, cls.__dict__.get(attr)
	while current is not None:
		n += getattr(current, "_self_wrapper", None) is wrapper
		current = getattr(current, "__wrapped__", None)
	return n
def layers():
	return [
		ours(psycopg2, "connect", frappe_layer.psycopg2_connect),
		ours(PostgresDatabase, "get_connection", frappe_layer.get_connection),
		ours(Database, "close", frappe_layer.close),
		ours(Database, "sql", frappe_layer.sql),
		ours(frappe_database, "setup_database", site_lifecycle.setup_database),
	]
"""


def script(*parts: str) -> str:
	"""Pieces of a bench script, each dedented on its own."""
	return "\n".join(textwrap.dedent(part) for part in parts)


@pytest.mark.parametrize("env", [NOT_ARMED, {}], ids=["not-armed", "armed-at-start"])
def test_install_before_frappe_is_imported_does_not_deadlock(env):
	try:
		(result,) = run_in_bench(
			"""
			import sys
			import frappe_pgpool.patch as patch
			before = "frappe.database.postgres.database" in sys.modules
			changed = patch.install()
			out(dict(before=before, changed=changed, installed=patch.is_installed()))
			""",
			env=env,
			timeout=60,
		)
	except subprocess.TimeoutExpired:
		pytest.fail(
			"patch.install() before Frappe's import hung: it waits on its own lock via the import hook"
		)
	assert result == {"before": False, "changed": True, "installed": True}


def test_patch_after_import_twice_unpatch_repatch():
	(steps,) = run_in_bench(
		script(
			"""
			import frappe, frappe.database.postgres.database
			import frappe_pgpool.patch as patch
			""",
			LAYERS,
			"""
		steps = [("imported", None, patch.is_installed(), layers())]
		for step in ("install", "install", "uninstall", "uninstall", "install"):
			changed = getattr(patch, step)()
			steps.append((step, changed, patch.is_installed(), layers()))
		out(steps)
		""",
		),
		env=NOT_ARMED,
	)
	one, none = [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]
	assert steps == [
		["imported", None, False, none],
		["install", True, True, one],
		["install", False, True, one],
		["uninstall", True, False, none],
		["uninstall", False, False, none],
		["install", True, True, one],
	]


def test_another_wrapt_wrapper_on_top_keeps_working_through_unpatch_and_repatch():
	(result,) = run_in_bench(
		script(
			"""
		import wrapt, frappe
		import frappe_pgpool.patch as patch
		from frappe_pgpool.pool import registry
		from frappe.database.postgres.database import PostgresDatabase
		patch.install()
		calls = []
		def outer(wrapped, instance, args, kwargs):  # e.g. an APM's instrumentation, applied after ours
			calls.append(1)
			return wrapped(*args, **kwargs)
		wrapt.wrap_function_wrapper(PostgresDatabase, "get_connection", outer)
		def request():
			frappe.init(site=SITE); frappe.local.conf["db_pool_enabled"] = 1; frappe.connect()
			pid = frappe.db.sql("select pg_backend_pid()")[0][0]
			frappe.destroy()
			return pid
		def pooled():
			return sum(p.snapshot()["checkouts"] for k, p in registry.pools().items() if k.site == SITE)
		""",
			LAYERS,
			"""
		a, b = request(), request()
		on = (a == b, pooled(), len(calls), layers())
		patch.uninstall()
		c, d = request(), request()
		off = (c == d, pooled(), len(calls), layers(), patch.is_installed())
		patch.install()
		e, f = request(), request()
		again = (e == f, pooled(), len(calls), layers(), patch.is_installed())
		out(dict(on=on, off=off, again=again, outer_on_top=PostgresDatabase.__dict__["get_connection"]._self_wrapper is outer))
		""",
		),
		env=NOT_ARMED,
	)
	assert result["on"] == [True, 2, 2, [1, 1, 1, 1, 1]]
	# ours stays under theirs as a pass-through (the rest is unwrapped): connections are Frappe's own again
	assert result["off"] == [False, 2, 4, [0, 1, 0, 0, 0], False]
	# and is switched back on, not wrapped a second time
	assert result["again"] == [True, 4, 6, [1, 1, 1, 1, 1], True]
	assert result["outer_on_top"] is True


@pytest.mark.parametrize(
	"version,supported",
	[("15.0.0", True), ("16.3.1", True), ("14.40.0", False), ("17.0.0-dev", False)],
)
def test_only_frappe_15_and_16_are_patched_anything_else_logs_once(version, supported):
	(result,) = run_in_bench(
		f"""
		import logging
		records = []
		class Keep(logging.Handler):
			def emit(self, record):
				records.append(record.getMessage())
		logging.getLogger("frappe_pgpool").addHandler(Keep())
		import frappe
		frappe.__version__ = {version!r}
		import frappe.database.postgres.database  # the import trigger installs the patch here
		import frappe_pgpool.patch as patch
		from frappe_pgpool import bootstrap
		again = patch.install()
		out(dict(installed=patch.is_installed(), again=again, armed=bootstrap.armed(), logs=records))
		"""
	)
	if supported:
		assert result == {"installed": True, "again": False, "armed": "start", "logs": []}
	else:
		assert result["installed"] is False and result["again"] is False and result["armed"] == "no"
		(line,) = result["logs"]
		assert f"Frappe {version}" in line and "15" in line and "16" in line and "unpooled" in line


def test_armed_says_how_the_process_was_armed():
	(result,) = run_in_bench(
		"""
		import os, sys
		from frappe_pgpool import bootstrap
		before = bootstrap.armed()
		import frappe, frappe.database.postgres.database
		disabled = bootstrap.armed()
		os.environ.pop("FRAPPE_PGPOOL_DISABLE_PATCH")
		bootstrap.arm()  # what the request/job hooks do in a process that was not armed at start
		out(dict(before=before, disabled=disabled, late=bootstrap.armed()))
		""",
		env=NOT_ARMED,
	)
	assert result == {"before": "no", "disabled": "no", "late": "hook"}
	(at_start,) = run_in_bench(
		"""
		from frappe_pgpool import bootstrap
		before = bootstrap.armed()
		import frappe.database.postgres.database
		out([before, bootstrap.armed()])
		"""
	)
	assert at_start == ["start", "start"]


POOLED_LOOP = """
import frappe
from frappe_pgpool.pool import registry
rows = []
for i in range({n}):
	frappe.init(site=SITE)
	frappe.local.conf.update({conf!r})
	frappe.connect()
	pid = frappe.db.sql("select pg_backend_pid()")[0][0]
	iso = frappe.db.sql("show transaction_isolation")[0][0]
	frappe.destroy()
	pools = [p.snapshot() for k, p in registry.pools().items() if k.site == SITE]
	rows.append(dict(pid=pid, iso=iso, pools=pools))
out(rows)
"""


def test_connections_are_reused_across_frappe_init_connect_destroy():
	(rows,) = run_in_bench(POOLED_LOOP.format(n=20, conf={"db_pool_enabled": 1}))
	assert len({r["pid"] for r in rows}) == 1
	assert {r["iso"] for r in rows} == {"repeatable read"}  # what Frappe's get_connection sets
	last = rows[-1]["pools"]
	assert len(last) == 1
	assert (last[0]["created"], last[0]["checkouts"], last[0]["in_use"], last[0]["idle"]) == (1, 20, 0, 1)


def test_a_site_with_the_pool_disabled_is_plain_frappe():
	(rows,) = run_in_bench(POOLED_LOOP.format(n=5, conf={"db_pool_enabled": 0}))
	assert len({r["pid"] for r in rows}) == 5
	assert all(r["pools"] == [] for r in rows)


def test_a_bad_value_is_logged_once_and_the_site_is_served_unpooled():
	capture = """
import logging
errors = []
class Keep(logging.Handler):
	def emit(self, record):
		errors.append(record.getMessage())
logging.getLogger("frappe_pgpool").addHandler(Keep())
"""
	rows, errors = run_in_bench(
		capture
		+ POOLED_LOOP.format(n=3, conf={"db_pool_enabled": 1, "db_pool_size": "lots"})
		+ "out(errors)\n"
	)
	assert len({r["pid"] for r in rows}) == 3 and all(r["pools"] == [] for r in rows)
	assert len(errors) == 1
	assert "db_pool_size='lots'" in errors[0] and "without the pool" in errors[0]


def test_switching_the_pool_off_closes_what_the_process_holds():
	(result,) = run_in_bench(
		"""
		import time
		import frappe
		from frappe_pgpool.pool import registry
		def request(enabled):
			frappe.init(site=SITE)
			frappe.local.conf["db_pool_enabled"] = enabled
			frappe.connect()
			pid = frappe.db.sql("select pg_backend_pid()")[0][0]
			frappe.destroy()
			return pid
		first, second = request(1), request(1)
		off = request(0)
		pools_after_off = [k.site for k in registry.pools()]
		frappe.init(site=SITE); frappe.connect()
		deadline = time.monotonic() + 60  # a closed connection's backend exits in its own time
		while True:
			frappe.db.sql("select pg_stat_clear_snapshot()")  # else the transaction's first view is kept
			alive = frappe.db.sql("select count(*) from pg_stat_activity where pid = %s", (first,))[0][0]
			if not alive or time.monotonic() > deadline:
				break
			time.sleep(0.05)
		frappe.destroy()
		again = request(1)
		out(dict(first=first, second=second, off=off, pools_after_off=pools_after_off, alive=alive, again=again))
		"""
	)
	assert result["first"] == result["second"] != result["off"]
	assert result["pools_after_off"] == [] and result["alive"] == 0
	assert result["again"] != result["first"]


def test_first_statement_on_a_connection_that_died_after_checkout_is_retried_once():
	(result,) = run_in_bench(
		"""
		import time
		import frappe, psycopg2
		from frappe_pgpool.pool import registry
		def kill(pid):
			conf = frappe.local.conf
			admin = psycopg2.connect(host=conf.db_host or "127.0.0.1", port=conf.db_port or 5432, user="postgres", dbname="postgres")
			admin.autocommit = True
			admin.cursor().execute("select pg_terminate_backend(%s)", (pid,))
			admin.close()
			time.sleep(0.2)
		frappe.init(site=SITE); frappe.local.conf["db_pool_enabled"] = 1; frappe.connect()
		first = frappe.db.sql("select pg_backend_pid()")[0][0]
		frappe.destroy()
		# checkout passes the liveness check, then the server goes away before the first statement
		frappe.init(site=SITE); frappe.local.conf["db_pool_enabled"] = 1; frappe.connect()
		frappe.db.connect()
		kill(first)
		second = frappe.db.sql("select pg_backend_pid()")[0][0]
		# a later statement's failure is never retried
		kill(second)
		try:
			frappe.db.sql("select 1")
			later = "no error"
		except psycopg2.OperationalError:
			later = "raised"
		frappe.destroy()
		(pool,) = [p.snapshot() for k, p in registry.pools().items() if k.site == SITE]
		out(dict(first=first, second=second, later=later, closed=pool["closed"], in_use=pool["in_use"]))
		"""
	)
	assert result["second"] != result["first"]
	assert result["later"] == "raised"
	assert result["in_use"] == 0 and result["closed"].get("discarded") == 1
