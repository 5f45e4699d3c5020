"""The first-statement retry on the real bench: only when nothing of the transaction or session can
have been lost, never after a statement ran on the checkout (plain Frappe raises there, so must we).

A backend is terminated at chosen points with pg_terminate_backend, and the script waits until the
client's socket has seen it. Also the Frappe v16 shapes that can be reproduced on v15: a reconnect
over an open connection (v16's dangerously_reconnect_on_connection_abort calls connect() without
close()), a statement run on the cursor inside connect() (v16's SET search_path), COMMIT AND CHAIN.
"""

from __future__ import annotations

import pytest

from .bench import requires_bench, run_in_bench

pytestmark = [pytest.mark.frappe, requires_bench]

SCRIPT = """
import select, time
import frappe, psycopg2, wrapt
from frappe_pgpool.pool import registry

TABLE = "pgpool_retry_probe"
frappe.init(site=SITE, sites_path=".")
frappe.connect()
conf = frappe.conf
admin = psycopg2.connect(host=conf.db_host or "127.0.0.1", port=conf.db_port or 5432,
    user=os.environ.get("PGPOOL_E2E_PG_SUPERUSER", "postgres"), dbname="postgres")
admin.autocommit = True

def kill(conn):
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    assert poller.poll(5000), "the client never saw its backend go"

kill_at_checkout = []
def killer(wrapped, instance, args, kwargs):
    conn = wrapped(*args, **kwargs)
    if kill_at_checkout:
        kill_at_checkout.pop()
        kill(conn)
    return conn
wrapt.wrap_function_wrapper("frappe.database.postgres.database", "PostgresDatabase.get_connection", killer)

frappe.db.sql(f"CREATE TABLE IF NOT EXISTS {TABLE} (tag text)")
frappe.db.sql(f"DELETE FROM {TABLE}")
frappe.db.commit()
frappe.destroy()

def fresh():
    frappe.init(site=SITE, sites_path=".")
    frappe.connect()

def rows(tag):
    fresh()
    n = frappe.db.sql(f"SELECT count(*) FROM {TABLE} WHERE tag = %s", tag)[0][0]
    frappe.destroy()
    return n

def attempt(steps):
    try:
        steps()
        frappe.db.commit()
        return "ok"
    except Exception as e:
        return type(e).__name__
    finally:
        frappe.destroy()

def insert(tag):
    frappe.db.sql(f"INSERT INTO {TABLE} VALUES (%s)", tag)

results = {}

def between_1_and_2():
    insert("a"); kill(frappe.db._conn); insert("a")
fresh(); results["kill between statements 1 and 2"] = (attempt(between_1_and_2), rows("a"))

def before_1_lazy():
    kill_at_checkout.append(1); insert("b")
fresh(); results["kill before statement 1 (lazy connect)"] = (attempt(before_1_lazy), rows("b"))

def before_1_explicit():
    frappe.db.connect(); kill(frappe.db._conn); insert("c")
fresh(); results["kill before statement 1 (explicit connect)"] = (attempt(before_1_explicit), rows("c"))

def after_commit():
    insert("d"); frappe.db.commit(); kill(frappe.db._conn); insert("d")
fresh(); results["kill after a commit"] = (attempt(after_commit), rows("d"))

def for_update():
    frappe.db.sql(f"SELECT * FROM {TABLE} FOR UPDATE"); kill(frappe.db._conn); insert("e")
fresh(); results["FOR UPDATE then kill"] = (attempt(for_update), rows("e"))

def snapshot():
    frappe.db.sql(f"SELECT count(*) FROM {TABLE}"); kill(frappe.db._conn); frappe.db.sql(f"SELECT count(*) FROM {TABLE}")
fresh(); results["REPEATABLE READ snapshot then kill"] = (attempt(snapshot), None)

def chained():
    insert("f"); frappe.db.sql("COMMIT AND CHAIN"); kill(frappe.db._conn); insert("f")
fresh(); results["COMMIT AND CHAIN then kill"] = (attempt(chained), rows("f"))

# a first statement that was running when its backend was killed (a DBA's pg_terminate_backend, the OOM
# killer): it ran, so it is not run again, even though nothing of it was committed
import threading
def killed_while_running():
    frappe.db.connect()
    conn = frappe.db._conn
    def later():
        time.sleep(0.5)
        kill(conn)
    threading.Thread(target=later).start()
    frappe.db.sql("SELECT pg_sleep(3)")
fresh(); started = time.monotonic()
outcome = attempt(killed_while_running)
results["first statement killed while running"] = (outcome, round(time.monotonic() - started, 1))

# v15's enable_db_statement_timeout runs SET LOCAL through sql() inside connect()
def timeout_in_connect():
    frappe.local.conf.enable_db_statement_timeout = 1
    frappe.local.request = object()  # get_query_execution_timeout: "an HTTP request"
    try:
        kill_at_checkout.append(1); insert("g")
    finally:
        del frappe.local.request
fresh(); results["kill before SET LOCAL statement_timeout in connect()"] = (attempt(timeout_in_connect), rows("g"))

# v16's connect() runs SET search_path on the cursor itself, outside sql()
from frappe.database.postgres.database import PostgresDatabase
original_connect = PostgresDatabase.connect
def v16_connect(self):
    original_connect(self)
    self._cursor.execute("SET search_path TO public")
PostgresDatabase.connect = v16_connect
def search_path_in_connect():
    kill_at_checkout.append(1); insert("h")
fresh(); results["kill before SET search_path in connect() (v16 shape)"] = (attempt(search_path_in_connect), rows("h"))
PostgresDatabase.connect = original_connect

# v16 reconnects over an open connection without close(): the old checkout must not keep its slot
fresh()
frappe.local.conf.db_pool_timeout = 1
try:
    frappe.db.sql("SELECT 1")
    for _ in range(12):  # more than db_pool_size (8)
        frappe.db.connect()
        frappe.db.sql("SELECT 1")
    (pool,) = [p for k, p in registry.pools().items() if k.site == SITE]
    results["reconnect without close x12: in use"] = (pool.snapshot()["in_use"], pool.snapshot()["size"])
except Exception as e:
    results["reconnect without close x12: in use"] = type(e).__name__
frappe.destroy()

# a chained commit leaves no state for the next checkout
fresh()
frappe.db.sql("SET SESSION statement_timeout = 1234")
insert("i"); frappe.db.sql("COMMIT AND CHAIN"); insert("i")
frappe.destroy()
fresh()
results["after COMMIT AND CHAIN: next checkout"] = (
    frappe.db.sql("SHOW statement_timeout")[0][0], frappe.db.sql("SHOW transaction_isolation")[0][0], rows("i"))

fresh(); frappe.db.sql(f"DROP TABLE {TABLE}"); frappe.db.commit(); frappe.destroy()
out(results)
"""


@pytest.fixture(scope="module")
def results():
	(found,) = run_in_bench(SCRIPT)
	for name, value in found.items():
		print(f"\n{name}: {value}", end="")
	return found


@pytest.mark.parametrize(
	"case",
	[
		"kill between statements 1 and 2",
		"kill after a commit",
		"FOR UPDATE then kill",
		"COMMIT AND CHAIN then kill",
	],
)
def test_a_statement_after_the_first_is_never_retried(results, case):
	outcome, committed = results[case]
	assert outcome != "ok", f"{case}: the write went through on a new connection (silent data loss)"
	# only what was committed before the kill
	expected = 1 if case in ("kill after a commit", "COMMIT AND CHAIN then kill") else 0
	assert committed == expected


def test_a_first_statement_killed_while_running_is_not_run_again(results):
	outcome, seconds = results["first statement killed while running"]
	assert outcome != "ok" and seconds < 2.5  # raised at the kill, not re-run for another 3 s


def test_a_lost_snapshot_is_never_replaced_silently(results):
	outcome, _ = results["REPEATABLE READ snapshot then kill"]
	assert outcome != "ok"


@pytest.mark.parametrize(
	"case",
	[
		"kill before statement 1 (lazy connect)",
		"kill before statement 1 (explicit connect)",
		"kill before SET LOCAL statement_timeout in connect()",
		"kill before SET search_path in connect() (v16 shape)",
	],
)
def test_a_connection_dead_before_its_first_statement_is_replaced(results, case):
	assert results[case] == ["ok", 1]


def test_a_reconnect_without_close_gives_the_old_connection_back(results):
	in_use, size = results["reconnect without close x12: in use"]
	assert in_use == 1 and size == 1


def test_a_chained_commit_leaves_nothing_for_the_next_checkout(results):
	statement_timeout, isolation, committed = results["after COMMIT AND CHAIN: next checkout"]
	assert statement_timeout == "0" and isolation == "repeatable read"
	assert committed == 1  # the chained commit's first insert; the second was rolled back on return
