"""What the pool does to one psycopg2 connection: check it without a round trip, reset it, retire it.

No Frappe import.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions as ext
from psycopg2 import sql

from .config import DEFAULT_RESET_QUERY

_POLL_DEAD = select.POLLHUP | select.POLLERR | select.POLLNVAL

# What DISCARD ALL does (PostgreSQL docs), as statements that may share one multi-statement
# query. DISCARD ALL itself may not, and its RESET ALL wipes the connect-time session settings
# (SessionDefaults.settings: application_name and the other startup parameters pgBouncer applies
# with SET, psycopg2's DateStyle). Spelled out, the reset and putting them back cost one round trip.
DISCARD_ALL_STATEMENTS = (
	"CLOSE ALL",
	"SET SESSION AUTHORIZATION DEFAULT",
	"RESET ALL",
	"DEALLOCATE ALL",
	"UNLISTEN *",
	"SELECT pg_advisory_unlock_all()",
	"DISCARD PLANS",
	"DISCARD TEMP",
	"DISCARD SEQUENCES",
)


def socket_poller(conn: ext.connection) -> select.poll:
	"""A poll object watching the connection's socket; its descriptor never changes, so keep it."""
	poller = select.poll()
	poller.register(conn.fileno(), select.POLLIN)
	return poller


def is_usable(conn: ext.connection, poller: select.poll | None = None) -> bool:
	"""True when an idle connection can be handed out, decided without a round trip.

	`closed` and the transaction status stay "open/idle" after the server went away, but
	the socket of an idle connection becomes readable when the server sends FATAL and/or
	closes it (pg_terminate_backend, pgBouncer KILL or restart, Postgres restart). An idle
	connection can also be readable for a LISTEN notification or a NOTICE/ParameterStatus;
	libpq consumes those, so we let it read and only then judge.
	"""
	if conn.closed or conn.status != ext.STATUS_READY:
		return False
	events = (poller or socket_poller(conn)).poll(0)
	if not events:
		return True
	if events[0][1] & _POLL_DEAD:
		return False
	notices_before = len(conn.notices)
	try:
		conn.poll()  # PQconsumeInput: raises on EOF; stores notifications and notices
	except psycopg2.Error:
		return False
	if conn.closed:
		return False
	# An ERROR/FATAL sent while idle is turned into a notice by libpq; it precedes a close.
	return not any(n.startswith(("FATAL", "ERROR", "PANIC")) for n in conn.notices[notices_before:])


class Retire(Exception):
	"""The returned connection carries client-side state that cannot be undone without a round trip.

	The pool closes it instead of keeping it; `reason` is counted in the pool's statistics.
	"""

	def __init__(self, reason: str, detail: str) -> None:
		super().__init__(detail)
		self.reason = reason


class CursorTracker:
	"""The `cursor_factory` of a pooled connection: makes each cursor with the factory's own cursor
	factory and remembers it (weakly), so that the cursors still open when the connection comes back
	can be closed. A cursor kept after the return then raises InterfaceError, as in plain Frappe where
	the connection was closed, instead of running in the next holder's transaction.

	A callable, not a cursor subclass: the cursors keep the type the factory chose, and psycopg2's C
	functions that type-check the connection (register_type, execute_values) still get the real one.
	"""

	__slots__ = ("cursors", "factory")

	def __init__(self, factory: Callable[..., ext.cursor] | None) -> None:
		self.factory = factory if factory is not None else ext.cursor
		self.cursors: weakref.WeakSet[ext.cursor] = weakref.WeakSet()

	def __call__(self, conn: ext.connection, name: str | None = None) -> ext.cursor:
		cursor = self.factory(conn, name)
		self.cursors.add(cursor)
		return cursor

	def close_all(self) -> None:
		"""Close the cursors made during this checkout; client-side, no round trip.

		Raises Retire if one of them is a named (server-side) cursor still open: closing it sends
		CLOSE or a pg_cursors lookup, and a WITH HOLD one would outlive the transaction.
		"""
		cursors = list(self.cursors)
		self.cursors.clear()
		for cursor in cursors:
			if cursor.closed:
				continue
			if cursor.name is not None:
				raise Retire("named_cursor", f"named cursor {cursor.name!r} still open")
			cursor.close()  # an unnamed cursor's close() only marks it closed


# The settings made at connect, as their values after the login: the startup parameters pgBouncer
# applies with SET (client_encoding, DateStyle, TimeZone, standard_conforming_strings, application_name),
# psycopg2's own SET DATESTYLE (when the database's DateStyle is not ISO), IntervalStyle. RESET ALL goes
# back to the values a session started with (server, database, role, libpq startup packet), which through
# pgBouncer are not these. All are reported by the server to the client (GUC_REPORT), so recording them
# costs no round trip; a setting a factory SETs that is not reported is not put back.
_REPORTED_SETTINGS = (
	"application_name",
	"client_encoding",
	"DateStyle",
	"IntervalStyle",
	"TimeZone",
	"standard_conforming_strings",
)
# the statement that puts a given set of values back, rendered once per distinct set (not per connection)
_restore_sql: dict[tuple[tuple[str, str], ...], str] = {}


@dataclass(frozen=True, eq=False)
class SessionDefaults:
	"""The connection as the factory left it: what the return puts back.

	psycopg2's client-side state (session characteristics, encoding, cursor factory, per-connection
	typecasters, the notices and notifies lists) and the server's session-level settings.
	"""

	autocommit: bool
	isolation_level: int | None
	readonly: bool | None
	deferrable: bool | None
	# opened for pgBouncer session mode (or straight to PostgreSQL): the connection is a server session
	# of ours, reset on return and ended with its server; False: transaction mode (see reset)
	session: bool = True
	settings: tuple[tuple[str, str], ...] = ()  # name, value of the session-level settings at open
	encoding: str = ""
	cursors: CursorTracker = field(default_factory=lambda: CursorTracker(None))
	string_types: dict = field(default_factory=dict)
	binary_types: dict = field(default_factory=dict)
	notices: object = None
	notifies: object = None
	restore_settings: str = ""  # one statement that sets `settings` again, rendered once
	_reset_sql: dict[str, str] = field(default_factory=dict, repr=False)  # per reset_query

	@classmethod
	def capture(cls, conn: ext.connection, session: bool = True) -> SessionDefaults:
		"""Record a new connection and install the cursor tracker. No round trip.

		`session` False (pgBouncer transaction mode): no server session is ours, so no settings are
		put back by the reset (they would land on whichever server pgBouncer lent for it).
		On failure the connection is closed and the error raised.
		"""
		try:
			settings = _session_settings(conn) if session else ()
			restore = _restore_statement(conn, settings) if settings else ""
			tracker = CursorTracker(conn.cursor_factory)
			conn.cursor_factory = tracker
			return cls(
				conn.autocommit,
				conn.isolation_level,
				conn.readonly,
				conn.deferrable,
				session=session,
				settings=settings,
				encoding=conn.encoding,
				cursors=tracker,
				string_types=dict(conn.string_types),
				binary_types=dict(conn.binary_types),
				notices=conn.notices,
				notifies=conn.notifies,
				restore_settings=restore,
			)
		except BaseException:
			close_quietly(conn)
			raise

	def reset_sql(self, reset_query: str) -> str:
		"""The reset query string for this connection: reset_query, then the settings put back."""
		query = self._reset_sql.get(reset_query)
		if query is None:
			statements = _reset_statements(reset_query)
			if statements and self.restore_settings:
				statements.append(self.restore_settings)
			query = self._reset_sql[reset_query] = "; ".join(statements)
		return query

	def check(self, conn: ext.connection) -> None:
		"""Raise Retire when the connection cannot be put back without a round trip."""
		if conn.encoding != self.encoding:  # set_client_encoding(); setting it back would cost a SET
			raise Retire("client_encoding", f"client encoding changed to {conn.encoding}")

	def restore(self, conn: ext.connection) -> None:
		"""Undo a request's client-side changes; no round trip for a non-autocommit factory."""
		if (
			conn.autocommit is not self.autocommit
			or conn.isolation_level != self.isolation_level
			or conn.readonly is not self.readonly
			or conn.deferrable is not self.deferrable
		):
			_set_characteristics(conn, self.autocommit, self.isolation_level, self.readonly, self.deferrable)
		if conn.cursor_factory is not self.cursors:
			conn.cursor_factory = self.cursors
		for current, default in (
			(conn.string_types, self.string_types),
			(conn.binary_types, self.binary_types),
		):
			if current != default:  # psycopg2 reads these dicts at each typecast: fix them in place
				current.clear()
				current.update(default)
		if self.notices is not None and conn.notices is not self.notices:
			conn.notices = self.notices  # a list replaced by the holder (a deque, its own object)
		if self.notifies is not None and conn.notifies is not self.notifies:
			conn.notifies = self.notifies


def _set_characteristics(
	conn: ext.connection,
	autocommit: bool,
	isolation_level: int | None,
	readonly: bool | None,
	deferrable: bool | None,
) -> None:
	"""Set psycopg2's session characteristics, in the order that sends nothing to the server.

	Characteristics set under autocommit are sent as SET default_transaction_*, and leaving
	autocommit with characteristics set sends SETs back to default; outside autocommit they are
	only remembered for psycopg2's next BEGIN. So leave autocommit first, enter it last.
	Attribute setters, not set_session(): there None means "leave as is", here "default".
	"""
	if conn.autocommit:
		conn.autocommit = autocommit
	conn.isolation_level = isolation_level
	conn.readonly = readonly
	conn.deferrable = deferrable
	conn.autocommit = autocommit


def _session_settings(conn: ext.connection) -> tuple[tuple[str, str], ...]:
	"""The connect-time values of the reported settings, as the login left them; no round trip."""
	status = conn.info.parameter_status
	return tuple((name, value) for name in _REPORTED_SETTINGS if (value := status(name)) is not None)


def _restore_statement(conn: ext.connection, settings: tuple[tuple[str, str], ...]) -> str:
	statement = _restore_sql.get(settings)
	if statement is None:
		calls = sql.SQL(", ").join(
			sql.SQL("pg_catalog.set_config({}, {}, false)").format(sql.Literal(n), sql.Literal(v))
			for n, v in settings
		)
		statement = (sql.SQL("SELECT ") + calls).as_string(conn)
		if len(_restore_sql) > 1024:  # one per site and process in practice; never unbounded
			_restore_sql.clear()
		_restore_sql[settings] = statement
	return statement


def reset(conn: ext.connection, defaults: SessionDefaults, reset_query: str) -> None:
	"""Bring a returned connection back to the state the factory made. Raises on any failure.

	Raises Retire, before sending anything, for client-side state that cannot be put back without
	a round trip. Closes the cursors made during the checkout (client-side). The rollback goes
	through psycopg2 when psycopg2 knows of the transaction, so that it forgets it too: otherwise
	the next request's first statement would run without psycopg2's BEGIN, outside any transaction.
	A request that opened a transaction itself (Frappe's "START TRANSACTION" after a commit) is
	covered the same way, since psycopg2 then still believes its own BEGIN is open. In session mode
	the reset query then ends by setting the connect-time session settings again (RESET ALL dropped
	them); in transaction mode see _release_lent_server.
	"""
	defaults.check(conn)
	defaults.cursors.close_all()
	if not defaults.session:
		_release_lent_server(conn)
	if conn.status != ext.STATUS_READY:
		conn.rollback()
	elif conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
		with conn.cursor(cursor_factory=ext.cursor) as cur:  # a BEGIN sent as SQL text under autocommit
			cur.execute("ROLLBACK")
	if conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
		raise psycopg2.InterfaceError("connection still in a transaction after rollback")
	query = defaults.reset_sql(reset_query) if reset_query and defaults.session else ""
	if query:
		# Autocommit, so that psycopg2 sends no BEGIN around the reset (switching sends nothing).
		_set_characteristics(conn, True, None, None, None)
		with conn.cursor(cursor_factory=ext.cursor) as cur:
			cur.execute(query)
	defaults.restore(conn)  # client-side only: no round trip for a non-autocommit factory
	if conn.notices:
		del conn.notices[:]
	if conn.notifies:
		del conn.notifies[:]


# Behind a transaction pooler the server lent for the request's open transaction goes back to pgBouncer's
# pool at the rollback, for any client. Plain Frappe closes inside that transaction, so pgBouncer discards
# the server. What the transaction made that a rollback keeps is undone here, inside it, first: session
# advisory locks and sequence state; a prepared statement (SQL PREPARE) would need DEALLOCATE, which
# would also drop the statements pgBouncer prepared there for other clients, so that server is discarded
# instead, as plain Frappe's is. Settings, temporary tables, LISTEN, role and cursors made in the
# transaction are rolled back with it. One round trip, on the server still lent to us.
TRANSACTION_MODE_RELEASE = (
	"SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD SEQUENCES; "
	"SELECT EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql)"
)


def _release_lent_server(conn: ext.connection) -> None:
	"""Transaction mode: leave the server lent for the open transaction as plain Frappe's close would."""
	status = conn.get_transaction_status()
	if status == ext.TRANSACTION_STATUS_IDLE:
		return  # no transaction open: no server is lent to us
	release = TRANSACTION_MODE_RELEASE
	if status == ext.TRANSACTION_STATUS_INERROR:
		# a failed transaction runs nothing until it ends: ended, and a new one begun, in the same message,
		# so the release runs on the lent server and the message ends inside a transaction: pgBouncer keeps
		# the server ours (a prepared statement found closes it inside that transaction; else psycopg2's own
		# rollback below ends it there, never needing another server of a saturated pool)
		release = "ROLLBACK; BEGIN; " + release
	with conn.cursor(cursor_factory=ext.cursor) as cur:
		cur.execute(release)
		prepared = cur.fetchone()[0]
	if prepared:
		raise Retire("prepared_statement", "an SQL prepared statement is left on the lent server")


def _reset_statements(reset_query: str) -> list[str]:
	query = reset_query.strip().rstrip(";")
	if not query:
		return []
	if query.upper() == DEFAULT_RESET_QUERY:
		return list(DISCARD_ALL_STATEMENTS)
	return [query]


def close_ending_server(conn: ext.connection, drop_server: bool) -> None:
	"""Close a kept connection the way plain Frappe's ends: pgBouncer drops the server behind it too.

	A client that leaves idle gives pgBouncer (session mode) its server back idle, kept for that database
	until server_idle_timeout (10 minutes by default): a process ending connections across many sites would
	leave an idle PostgreSQL backend per site, which plain Frappe, leaving inside a transaction at every
	request, never does; and the next login would be given that backend without PostgreSQL checking the
	role's LOGIN or CONNECT again. So an idle connection of a session (`drop_server`) sends BEGIN and
	leaves without waiting for the answer: pgBouncer sees its client go with a transaction open and closes
	the server. Nothing is waited for, so another site's stalled network path or busy server never holds
	up the caller (libpq sends it in non-blocking mode; a full socket buffer only drops the BEGIN). Without
	pgBouncer the backend ends with the connection anyway. In transaction mode an idle client holds no
	server, but its last return gave one back to its pgBouncer pool idle, kept there until
	server_idle_timeout too: the BEGIN has pgBouncer lend that idle server (the most recently used first)
	and drop it with the client, so evicting kept clients across many sites leaves no idle backend per
	site either. If the pool has no idle server (all busy, or gone), the BEGIN queues and goes with the
	client, nothing waiting for it; below pool_size pgBouncer may start a server for it, which then stays
	idle: one at most per end, in the rare case, where ending without it left one in the common case.
	"""
	try:
		if (
			drop_server
			and not conn.closed
			and conn.status == ext.STATUS_READY
			and conn.get_transaction_status() == ext.TRANSACTION_STATUS_IDLE
		):
			_send_without_waiting(conn, b"BEGIN")
	except (psycopg2.Error, OSError):  # a dead or odd connection: closing it is all that is left
		pass
	finally:  # closed even when interrupted (RQ's job timeout is an Exception: it goes on up)
		close_quietly(conn)


class _LibPQ:
	"""libpq's PQsetnonblocking and PQsendQuery, from the libpq psycopg2 itself is linked with."""

	def __init__(self) -> None:
		from psycopg2 import _psycopg

		lib = ctypes.CDLL(_psycopg.__file__)  # its dependencies' symbols too: the very libpq it uses
		self.set_nonblocking = lib.PQsetnonblocking
		self.set_nonblocking.argtypes = (ctypes.c_void_p, ctypes.c_int)
		self.set_nonblocking.restype = ctypes.c_int
		self.send_query = lib.PQsendQuery
		self.send_query.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
		self.send_query.restype = ctypes.c_int


_libpq: _LibPQ | None = None
_libpq_missing = False


def _send_without_waiting(conn: ext.connection, query: bytes) -> bool:
	"""Queue a query on an idle connection that is about to be closed, through libpq (so TLS works), in
	non-blocking mode; its answer is never read. False when libpq's functions cannot be reached."""
	global _libpq, _libpq_missing
	if _libpq is None:
		if _libpq_missing:
			return False
		try:
			_libpq = _LibPQ()
		except (OSError, AttributeError, ImportError):
			_libpq_missing = True  # closed without it: pgBouncer keeps the server idle, as before
			return False
	pointer = conn.pgconn_ptr
	if not pointer or _libpq.set_nonblocking(pointer, 1) != 0:
		return False
	return _libpq.send_query(pointer, query) == 1


# A statement that may create a custom (dotted) setting: set_config() anywhere (any case), or SET/RESET of a
# dotted name at the start of the string or of a later statement in it, behind comments. PostgreSQL keeps
# such a placeholder for the session's life: after any reset it reads '' where a fresh session has none
# (NULL, or an error), and it is never listed (pg_settings hides placeholders), so no reset can undo it nor
# a query find it. The return closes such a connection instead (see mark). One made server-side (a
# function's SET clause, set_config inside PL/pgSQL) is not seen.
_SET_CUSTOM = (
	r"\s*(?:(?:/\*.*?\*/|--[^\n]*\n)\s*)*(?:set|reset)\s+(?:(?:session|local)\s+)?\"?[A-Za-z_][\w$]*\"?\s*\."
)
_custom_set_at_start = re.compile(_SET_CUSTOM, re.IGNORECASE | re.DOTALL).match  # bound: run per statement
_custom_set_later = re.compile(";" + _SET_CUSTOM, re.IGNORECASE | re.DOTALL).search
_set_config_call = re.compile(r"set_config\s*\(", re.IGNORECASE).search


def may_define_custom_setting(query: object) -> bool:
	"""Whether an SQL statement may create a custom setting (cheap: run on every statement Frappe sends)."""
	if not isinstance(query, str):
		return False
	if ("onfig" in query or "ONFIG" in query) and _set_config_call(query) is not None:
		return True
	if _custom_set_at_start(query) is not None:
		return True
	return ";" in query and _custom_set_later(query) is not None


def close_quietly(conn: ext.connection) -> None:
	try:
		conn.close()
	except (psycopg2.Error, OSError):  # closing a broken connection must never raise into a request
		pass


def disown(conn: ext.connection) -> None:
	"""Make a connection inherited through fork() harmless in the child, without touching the server.

	Closing it normally would send a Terminate message on the socket the parent still uses.
	Instead the child's copy of the descriptor is pointed at /dev/null: the parent's socket
	stays open and untouched, and whatever libpq later writes or closes in the child (a
	query, a Terminate on garbage collection) goes nowhere.
	"""
	if conn.closed:
		return
	try:
		fd = conn.fileno()
	except psycopg2.Error:
		return
	devnull = os.open(os.devnull, os.O_RDWR)
	try:
		os.dup2(devnull, fd)
	finally:
		os.close(devnull)


def keepalive_options(idle: int = 30, interval: int = 10, count: int = 3) -> dict[str, int]:
	"""libpq connection options that notice a silent network loss, set in C while connecting.

	libpq turns keepalives on with the kernel's defaults (2 hours idle). TCP_USER_TIMEOUT bounds
	the other case, a statement sent into a silent network: unacknowledged data makes the kernel
	drop the connection after the same time instead of ~15 minutes of retransmissions. A long-running
	query is not affected (the server's kernel acknowledges it). libpq ignores them on a Unix socket.
	Options, not setsockopt on the open socket: no Python work per connection (a miss pays nothing).
	"""
	options = {
		"keepalives": 1,
		"keepalives_idle": idle,
		"keepalives_interval": interval,
		"keepalives_count": count,
	}
	if ext.libpq_version() >= 120000:  # tcp_user_timeout is a libpq 12 option; older ones reject it
		options["tcp_user_timeout"] = (idle + interval * count) * 1000
	return options
