"""The patch against real Frappe: idempotent install/uninstall in every order, and the wrapped methods."""

from __future__ import annotations

import itertools

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
		alive = frappe.db.sql("select count(*) from pg_stat_activity where pid = %s", (first,))[0][0]
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
