"""What the pool does to one psycopg2 connection: check it without a round trip, reset it, retire it.

No Frappe import.
"""

from __future__ import annotations

import os
import select
import socket
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions as ext
from psycopg2 import sql

from .config import DEFAULT_RESET_QUERY

_POLL_DEAD = select.POLLHUP | select.POLLERR | select.POLLNVAL

# What DISCARD ALL does (PostgreSQL docs), as statements that may share one multi-statement
# query. DISCARD ALL itself may not, and its RESET ALL wipes application_name: through pgBouncer
# that name is a SET made when pgBouncer links a server, not a startup value RESET goes back to.
# Spelled out, the reset and putting the name back cost one round trip together.
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


@dataclass(frozen=True)
class SessionDefaults:
	"""psycopg2's client-side session characteristics as the factory left them."""

	autocommit: bool
	isolation_level: int | None
	readonly: bool | None
	deferrable: bool | None
	application_name: str = ""  # as the server reported it at connect time

	@classmethod
	def capture(cls, conn: ext.connection) -> SessionDefaults:
		name = conn.info.parameter_status("application_name") or ""
		return cls(conn.autocommit, conn.isolation_level, conn.readonly, conn.deferrable, name)

	def restore(self, conn: ext.connection) -> None:
		"""Undo a request's set_session/autocommit changes; client-side only, no round trip."""
		if (
			conn.autocommit is not self.autocommit
			or conn.isolation_level != self.isolation_level
			or conn.readonly is not self.readonly
			or conn.deferrable is not self.deferrable
		):
			# attribute setters, not set_session(): there None means "leave as is", here "default"
			conn.autocommit = self.autocommit
			conn.isolation_level = self.isolation_level
			conn.readonly = self.readonly
			conn.deferrable = self.deferrable


def reset(conn: ext.connection, defaults: SessionDefaults, reset_query: str) -> None:
	"""Bring a returned connection back to the state the factory made. Raises on any failure.

	The rollback goes through psycopg2 when psycopg2 knows of the transaction, so that it
	forgets it too: otherwise the next request's first statement would run without psycopg2's
	BEGIN, outside any transaction. A request that opened a transaction itself (Frappe's
	"START TRANSACTION" after a commit) is covered the same way, since psycopg2 then still
	believes its own BEGIN is open.
	"""
	if conn.status != ext.STATUS_READY:
		conn.rollback()
	elif conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
		with conn.cursor() as cur:  # a BEGIN sent as SQL text under autocommit
			cur.execute("ROLLBACK")
	if conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
		raise psycopg2.InterfaceError("connection still in a transaction after rollback")
	statements = _reset_statements(reset_query) if reset_query else None
	if statements:
		if defaults.application_name:
			statements.append(
				sql.SQL("SET application_name TO {}").format(sql.Literal(defaults.application_name))
			)
		# Autocommit, so that psycopg2 sends no BEGIN around the reset. Toggling it costs no round
		# trip only while the session characteristics are at their defaults (else psycopg2 SETs them).
		conn.isolation_level = None
		conn.readonly = None
		conn.deferrable = None
		conn.autocommit = True
		with conn.cursor() as cur:
			cur.execute(sql.SQL("; ").join(statements))
	defaults.restore(conn)  # client-side only: no round trip for a non-autocommit factory
	if conn.notices:
		del conn.notices[:]
	if conn.notifies:
		del conn.notifies[:]


def _reset_statements(reset_query: str) -> list[sql.Composable]:
	query = reset_query.strip().rstrip(";")
	if not query:
		return []
	if query.upper() == DEFAULT_RESET_QUERY:
		return [sql.SQL(statement) for statement in DISCARD_ALL_STATEMENTS]
	return [sql.SQL(query)]


def close_quietly(conn: ext.connection) -> None:
	try:
		conn.close()
	except Exception:  # closing a broken connection must never raise into a request
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


def set_keepalive(conn: ext.connection, idle: int = 30, interval: int = 10, count: int = 3) -> None:
	"""Tighten TCP keepalives on the connection's socket so a silent network loss is noticed.

	libpq turns keepalives on with the kernel's defaults (2 hours idle); options are per
	socket, so setting them on a dup of the descriptor changes the connection's socket.
	TCP_USER_TIMEOUT bounds the other case, a statement sent into a silent network: unacknowledged
	data makes the kernel drop the connection after the same time instead of ~15 minutes of
	retransmissions. A long-running query is not affected (the server's kernel acknowledges it).
	"""
	try:
		sock = socket.socket(fileno=os.dup(conn.fileno()))  # detects the real family
	except OSError:
		return
	try:
		if sock.family not in (socket.AF_INET, socket.AF_INET6):
			return
		sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
		sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
		sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
		sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
		if hasattr(socket, "TCP_USER_TIMEOUT"):
			sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, (idle + interval * count) * 1000)
	except OSError:
		pass
	finally:
		sock.close()
