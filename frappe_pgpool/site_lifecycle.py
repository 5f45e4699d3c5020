"""The bench commands that drop a site's database while its workers may be pooling it.

`bench --site S reinstall`, `restore` and `new-site --force` go through Frappe's PostgreSQL
`setup_database()`, which drops the site's database (`DROP DATABASE IF EXISTS`) on its root
connection without ending the database's other sessions. In plain Frappe every session of a site
lives inside a request or job (`active` or `idle in transaction`) and ends with it, so the DROP,
which PostgreSQL lets wait up to 5 s for other sessions to go, gets through. A pool keeps sessions
open between requests (`idle`): those of gunicorn and RQ worker processes, of the command's own
process (reinstall connects first to read the installed apps), and, behind pgBouncer in
transaction mode, the idle servers pgBouncer keeps after a pooled client's clean return. Each of
them would fail the DROP with `ObjectInUse: database ... is being accessed by other users`.

So before Frappe's setup_database runs (wrapped where installer.py calls it: frappe.database's
dispatcher, which imports the PostgreSQL module only then), the wrapper here closes this process's
pools of the site and, on Frappe's own root connection (obtained exactly as setup_database obtains it), ends the database's
`idle` sessions other than its own and drops the database itself, ending the idle sessions again and
retrying when a session that was in a request meanwhile went back to its pool (at most 3 tries). A
session inside a request or job is never ended: PostgreSQL lets the DROP wait for it as in plain
Frappe. Frappe's setup_database then runs unchanged (its DROP ... IF EXISTS finds nothing to drop).
If the root login may not end other roles' sessions, or anything else here fails, this logs why and
leaves everything to Frappe's setup_database: the same outcome as without the app.

`bench drop-site` needs nothing: Frappe's drop_user_and_database already ends every session of the
database before its DROP (tests/frappe/test_site_lifecycle.py runs it with pooling workers up).
"""

from __future__ import annotations

import inspect
import logging

import psycopg2.errors
import psycopg2.extensions as ext

from .pool import registry

log = logging.getLogger("frappe_pgpool")

DROP_TRIES = 3
# The database's sessions a pool keeps between requests; never this connection's own.
TERMINATE_IDLE = (
	"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
	"WHERE datname = %s AND state = 'idle' AND pid <> pg_backend_pid()"
)


def setup_database(wrapped, instance, args, kwargs):
	"""Wrapper of frappe.database.setup_database (which calls PostgreSQL's or MariaDB's): on PostgreSQL,
	end the idle sessions first."""
	import frappe

	if frappe.conf.db_type != "postgres":
		return wrapped(*args, **kwargs)
	db_name = frappe.conf.db_name
	site = getattr(frappe.local, "site", None)
	if site and registry.holds_site(site):
		registry.close_site(site)  # this process's own kept sessions (reinstall connected before)
	if db_name:
		try:
			drop_database(db_name)
		except Exception as e:  # never worse than plain Frappe: its setup_database does what it does
			log.warning(
				"frappe_pgpool: could not end the idle sessions of database %s before dropping it (%s: %s); "
				"Frappe drops it as without the app",
				db_name,
				type(e).__name__,
				e,
			)
	return wrapped(*args, **kwargs)


def drop_database(db_name: str) -> bool:
	"""Drop the database on Frappe's root connection after ending its idle sessions; True if dropped."""
	import frappe
	from frappe.database.postgres import setup_db

	# as setup_database gets it: Frappe 15 passes the command's root login (frappe.flags); newer
	# Frappe's setup_database calls get_root_connection() without arguments
	get_root_connection = setup_db.get_root_connection
	if inspect.signature(get_root_connection).parameters:
		root_conn = get_root_connection(frappe.flags.root_login, frappe.flags.root_password)
	else:
		root_conn = get_root_connection()
	# As setup_database does: `end` leaves psycopg2 believing a transaction is open, so it sends no
	# BEGIN before the next statements, and DROP DATABASE runs outside a transaction block.
	root_conn.commit()
	root_conn.sql("end")
	cursor = root_conn._cursor

	def outside_transaction() -> None:
		# again after a failed statement: the server may be in a transaction, or psycopg2 may want a BEGIN
		conn = cursor.connection
		if conn.status == ext.STATUS_READY or conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
			cursor.execute("end")

	for attempt in range(1, DROP_TRIES + 1):
		outside_transaction()
		try:
			cursor.execute(TERMINATE_IDLE, (db_name,))
		except psycopg2.errors.InsufficientPrivilege as e:
			log.warning(
				"frappe_pgpool: the root login %s may not end the pooled idle sessions of database %s (%s); "
				"DROP DATABASE fails while gunicorn or RQ workers keep sessions to it: run the command as a "
				"PostgreSQL superuser or a member of pg_signal_backend (GRANT pg_signal_backend TO ...), or "
				"stop the workers first",
				root_conn.user,
				db_name,
				str(e).strip(),
			)
			outside_transaction()
			return False
		ended = cursor.fetchone()[0]
		outside_transaction()
		try:
			cursor.execute(f'DROP DATABASE IF EXISTS "{db_name}"')
		except psycopg2.errors.ObjectInUse:
			log.info(
				"frappe_pgpool: database %s still in use after ending %s idle sessions (try %s of %s)",
				db_name,
				ended,
				attempt,
				DROP_TRIES,
			)
			continue
		return True
	log.warning(
		"frappe_pgpool: database %s is still in use after %s tries of ending its idle sessions (sessions in a "
		"request or job, or ones this root login cannot see); Frappe's DROP DATABASE waits for them as without "
		"the app",
		db_name,
		DROP_TRIES,
	)
	return False
