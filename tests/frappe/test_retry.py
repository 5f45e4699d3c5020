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

# PGPOOL_RETRY_NO_FAULT=1 removes the fault (nothing is terminated): every test of a fault must then fail
NO_FAULT = os.environ.get("PGPOOL_RETRY_NO_FAULT") == "1"
kills = []  # the evidence of each kill, in order: the fault must be shown to have landed

def backend_alive(pid):
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        return cur.fetchone()[0] == 1

def kill(conn, watch=True, pid=None):
    # watch=False: another thread is inside a query on conn, and its libpq reads (and may close) the
    # socket: that thread's error is what shows the client saw the kill (killed_while_running)
    pid = pid or conn.get_backend_pid()
    alive_before = backend_alive(pid)
    with admin.cursor() as cur:
        if NO_FAULT:
            cur.execute("SELECT false")
        else:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        terminated = cur.fetchone()[0]
    # hang detectors, not speed bounds: the client's socket becomes readable (the backend's goodbye) and
    # the backend leaves pg_stat_activity, each waited for up to 10 s
    seen = None
    if watch:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        seen = bool(poller.poll(10000))
    deadline = time.monotonic() + 10
    while backend_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    kills.append({"pid": pid, "alive_before": alive_before, "terminated": terminated,
        "client_saw_it": seen, "gone": not backend_alive(pid)})

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
frappe.db.sql("DROP SEQUENCE IF EXISTS pgpool_retry_runs")
frappe.db.sql("CREATE SEQUENCE pgpool_retry_runs")
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
    # what `steps` came to: its outcome ("ok" or the exception's type), the error's text, the kills made
    del kills[:]
    try:
        steps()
        frappe.db.commit()
        return {"outcome": "ok", "error": None, "kills": list(kills)}
    except Exception as e:
        return {"outcome": type(e).__name__, "error": str(e)[:300], "kills": list(kills)}
    finally:
        frappe.destroy()

def case(steps, tag=None):
    fresh()
    found = attempt(steps)
    found["rows"] = rows(tag) if tag else None
    return found

def insert(tag):
    frappe.db.sql(f"INSERT INTO {TABLE} VALUES (%s)", tag)

results = {}

def between_1_and_2():
    insert("a"); kill(frappe.db._conn); insert("a")
results["kill between statements 1 and 2"] = case(between_1_and_2, "a")

def before_1_lazy():
    kill_at_checkout.append(1); insert("b")
results["kill before statement 1 (lazy connect)"] = case(before_1_lazy, "b")

def before_1_explicit():
    frappe.db.connect(); kill(frappe.db._conn); insert("c")
results["kill before statement 1 (explicit connect)"] = case(before_1_explicit, "c")

def after_commit():
    insert("d"); frappe.db.commit(); kill(frappe.db._conn); insert("d")
results["kill after a commit"] = case(after_commit, "d")

def for_update():
    frappe.db.sql(f"SELECT * FROM {TABLE} FOR UPDATE"); kill(frappe.db._conn); insert("e")
results["FOR UPDATE then kill"] = case(for_update, "e")

def snapshot():
    frappe.db.sql(f"SELECT count(*) FROM {TABLE}"); kill(frappe.db._conn); frappe.db.sql(f"SELECT count(*) FROM {TABLE}")
results["REPEATABLE READ snapshot then kill"] = case(snapshot)

def chained():
    insert("f"); frappe.db.sql("COMMIT AND CHAIN"); kill(frappe.db._conn); insert("f")
results["COMMIT AND CHAIN then kill"] = case(chained, "f")

# a first statement that was running when its backend was killed (a DBA's pg_terminate_backend, the OOM
# killer): it ran, so it is not run again, even though nothing of it was committed
# the statement counts its runs in a sequence (nextval is not rolled back): run again, it would count 2
import threading
def killed_while_running():
    frappe.db.connect()
    conn = frappe.db._conn
    errors = []
    def when_it_runs():  # kills once the statement's backend is inside pg_sleep (no guessed delay)
        try:
            deadline = time.monotonic() + 60  # a hang detector
            while time.monotonic() < deadline:
                # found by its text, not by conn's pid: a checkout found dead at its first statement is
                # replaced before the statement runs (the first-statement retry), on another backend
                with admin.cursor() as cur:
                    cur.execute(
                        "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND wait_event = 'PgSleep'"
                        " AND query LIKE %s AND pid <> pg_backend_pid()", ("%pgpool_retry_runs%",))
                    row = cur.fetchone()
                if row:
                    kill(conn, watch=False, pid=row[0])
                    return
                time.sleep(0.02)
        except Exception as e:  # shown in the case's result, not lost in a thread
            errors.append(repr(e))
    killer_thread = threading.Thread(target=when_it_runs)
    killer_thread.start()
    try:
        frappe.db.sql("SELECT nextval('pgpool_retry_runs'), pg_sleep(20)")
    except Exception:
        killer_thread.join()
        if kills:
            kills[-1]["client_saw_it"] = True  # the statement running on it failed
        raise
    finally:
        killer_thread.join()
        if errors:
            kills.append({"killer_error": errors[0]})
found = case(killed_while_running)
fresh()
last_value, is_called = frappe.db.sql("SELECT last_value, is_called FROM pgpool_retry_runs")[0]
frappe.destroy()
found["runs"] = last_value if is_called else 0
results["first statement killed while running"] = found

# v15's enable_db_statement_timeout runs SET LOCAL through sql() inside connect()
def timeout_in_connect():
    frappe.local.conf.enable_db_statement_timeout = 1
    frappe.local.request = object()  # get_query_execution_timeout: "an HTTP request"
    try:
        kill_at_checkout.append(1); insert("g")
    finally:
        del frappe.local.request
results["kill before SET LOCAL statement_timeout in connect()"] = case(timeout_in_connect, "g")

# v16's connect() runs SET search_path on the cursor itself, outside sql()
from frappe.database.postgres.database import PostgresDatabase
original_connect = PostgresDatabase.connect
def v16_connect(self):
    original_connect(self)
    self._cursor.execute("SET search_path TO public")
PostgresDatabase.connect = v16_connect
def search_path_in_connect():
    kill_at_checkout.append(1); insert("h")
results["kill before SET search_path in connect() (v16 shape)"] = case(search_path_in_connect, "h")
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

fresh(); frappe.db.sql(f"DROP TABLE {TABLE}"); frappe.db.sql("DROP SEQUENCE pgpool_retry_runs"); frappe.db.commit(); frappe.destroy()
out(results)
"""


# what psycopg2 raises on a client whose backend was terminated: the message of the backend's goodbye,
# or of the socket found closed
FAULT_ERRORS = (
	"terminating connection due to administrator command",
	"server closed the connection unexpectedly",
	"connection already closed",
)


@pytest.fixture(scope="module")
def results():
	(found,) = run_in_bench(SCRIPT)
	for name, value in found.items():
		print(f"\n{name}: {value}", end="")
	return found


def assert_the_fault_landed(found: dict) -> None:
	"""Exactly one backend was killed in the case: it existed, was terminated, its client saw it go and
	PostgreSQL no longer lists it."""
	assert len(found["kills"]) == 1, found
	(kill,) = found["kills"]
	assert kill == {**kill, "alive_before": True, "terminated": True, "client_saw_it": True, "gone": True}, (
		found
	)


def assert_the_faults_error(found: dict) -> None:
	"""The case raised the error a terminated backend produces (not, say, an assertion of the script)."""
	assert found["outcome"] in ("OperationalError", "InterfaceError"), found
	assert any(text in found["error"] for text in FAULT_ERRORS), found


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
	found = results[case]
	assert_the_fault_landed(found)
	# raised, with the kill's own error: the write did not go through on a new connection (silent data loss)
	assert_the_faults_error(found)
	# only what was committed before the kill
	expected = 1 if case in ("kill after a commit", "COMMIT AND CHAIN then kill") else 0
	assert found["rows"] == expected


def test_a_first_statement_killed_while_running_is_not_run_again(results):
	found = results["first statement killed while running"]
	assert_the_fault_landed(found)
	assert_the_faults_error(found)  # raised at the kill
	assert found["runs"] == 1  # the statement's nextval ran once: it was not sent again


def test_a_lost_snapshot_is_never_replaced_silently(results):
	found = results["REPEATABLE READ snapshot then kill"]
	assert_the_fault_landed(found)
	assert_the_faults_error(found)


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
	found = results[case]
	assert_the_fault_landed(found)  # the connection handed out was dead ...
	assert found["outcome"] == "ok" and found["rows"] == 1, found  # ... and the statement went through


def test_a_reconnect_without_close_gives_the_old_connection_back(results):
	in_use, size = results["reconnect without close x12: in use"]
	assert in_use == 1 and size == 1


def test_a_chained_commit_leaves_nothing_for_the_next_checkout(results):
	statement_timeout, isolation, committed = results["after COMMIT AND CHAIN: next checkout"]
	assert statement_timeout == "0" and isolation == "repeatable read"
	assert committed == 1  # the chained commit's first insert; the second was rolled back on return
