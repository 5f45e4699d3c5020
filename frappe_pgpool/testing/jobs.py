"""Background jobs for the worker's tests and benchmark (tests/frappe/test_worker.py, benchmarks/jobs.py).

Enqueued with frappe.enqueue("frappe_pgpool.testing.jobs.<name>", ...) on a bench whose sites have
frappe_pgpool installed; each returns what it saw, which rq keeps as the job's result.
"""

from __future__ import annotations

import os
import time

import frappe
from frappe.utils.caching import site_cache

_RUNS = 0  # jobs run by this interpreter (a fresh one after a respawn starts at 0)


def _mark(path: str | None, value: object) -> None:
	if path:
		tmp = f"{path}.tmp"
		with open(tmp, "w") as f:
			f.write(str(value))
		os.replace(tmp, path)


def backend() -> dict:
	"""Which process, interpreter run and database session ran the job."""
	global _RUNS
	_RUNS += 1
	row = frappe.db.sql("SELECT pg_backend_pid(), current_database(), current_user")[0]
	return {"pid": os.getpid(), "run": _RUNS, "backend": row[0], "database": row[1], "db_user": row[2]}


def insert_and_read(tag: str, n: int = 0) -> dict:
	"""The benchmark's short job: insert a ToDo, read it back."""
	doc = frappe.get_doc({"doctype": "ToDo", "description": f"{tag}:{n}"}).insert(ignore_permissions=True)
	read = frappe.db.get_value("ToDo", doc.name, "description")
	return {"name": doc.name, "read": read, "pid": os.getpid(), "rss": _rss()}


def _rss() -> int:
	"""This process's resident set size in bytes (/proc/self/statm)."""
	with open("/proc/self/statm", "rb") as f:
		return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sleep_in_query(seconds: float, marker: str | None = None, tag: str | None = None) -> None:
	"""Wait in a query (a C call: no Python signal handler runs until it returns); with a tag, inside a
	transaction holding an uncommitted ToDo."""
	if tag:
		frappe.get_doc({"doctype": "ToDo", "description": tag}).insert(ignore_permissions=True)
	_mark(marker, frappe.db.sql("SELECT pg_backend_pid()")[0][0])
	frappe.db.sql("SELECT pg_sleep(%s)", (seconds,))


def sleep_in_python(seconds: float, marker: str | None = None, tag: str | None = None) -> dict:
	"""Hold a transaction open (a ToDo inserted first), then wait in Python; commit at the end."""
	if tag:
		frappe.get_doc({"doctype": "ToDo", "description": tag}).insert(ignore_permissions=True)
	_mark(marker, frappe.db.sql("SELECT pg_backend_pid()")[0][0])
	deadline = time.monotonic() + seconds
	while time.monotonic() < deadline:
		time.sleep(0.05)
	return backend()


def ignore_timeout(seconds: float, marker: str | None = None, tag: str | None = None) -> dict:
	"""Hold a transaction open (a ToDo inserted first), then loop in Python swallowing every exception,
	the job timeout's too (a catch-all retry loop): only a hard stop ends it before `seconds`."""
	if tag:
		frappe.get_doc({"doctype": "ToDo", "description": tag}).insert(ignore_permissions=True)
	_mark(marker, frappe.db.sql("SELECT pg_backend_pid()")[0][0])
	deadline = time.monotonic() + seconds
	while time.monotonic() < deadline:
		try:
			time.sleep(0.05)
		except Exception:  # the point: rq's JobTimeoutException is swallowed too
			continue
	return backend()


def crash_mid_query(marker: str | None = None) -> None:
	"""The job's database session dies under a running statement (as under the OOM killer or a DBA's
	pg_terminate_backend): psycopg2 raises OperationalError from the middle of the query."""
	_mark(marker, frappe.db.sql("SELECT pg_backend_pid()")[0][0])
	frappe.db.sql("SELECT pg_terminate_backend(pg_backend_pid())")


def fail(message: str) -> None:
	"""A job failing in its own code (not the database's)."""
	raise ValueError(message)


@site_cache
def _cached_site() -> str:
	return frappe.local.site


def observe_then_dirty(tag: str) -> dict:
	"""What the job sees of the state a previous job could have left, then leave some of each kind."""
	seen = {
		"site": frappe.local.site,
		"user": frappe.session.user,
		"lang": frappe.local.lang,
		"flag": frappe.flags.get("pgpool_tag"),
		"local": getattr(frappe.local, "pgpool_tag", None),
		"local_cache": frappe.local.cache.get("pgpool_tag"),
		"site_cache": _cached_site(),
		"redis": frappe.cache.get_value("pgpool_tag"),
		"database": frappe.db.sql("SELECT current_database()")[0][0],
		"db_user": frappe.db.sql("SELECT current_user")[0][0],
		"work_mem": frappe.db.sql("SHOW work_mem")[0][0],
		"timezone": frappe.db.sql("SHOW timezone")[0][0],
		"pending": frappe.db.sql(
			"SELECT count(*) FROM tabToDo WHERE description = %s", (f"uncommitted:{tag}",)
		)[0][0],
	}
	frappe.flags.pgpool_tag = tag
	frappe.local.pgpool_tag = tag
	frappe.local.cache["pgpool_tag"] = tag
	frappe.local.lang = "de"
	frappe.cache.set_value("pgpool_tag", tag)  # per-site key: the next job of this site sees it (by design)
	frappe.db.sql("SET work_mem = '7MB'")
	frappe.db.sql("SET TIME ZONE 'Asia/Tokyo'")
	frappe.set_user("Guest" if seen["user"] != "Guest" else "Administrator")
	return seen
