"""PostgreSQL as a connection to it reads it: which server it is, max_connections and its reserved
slots, the client backends in use, idle_session_timeout."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2

from .model import Connect


@dataclass(frozen=True)
class Server:
	"""One PostgreSQL server, as a connection to it reads it."""

	identity: str  # its system identifier (or address): the same server however it is reached
	name: str  # address:port as the server sees it
	version: str
	max_connections: int
	superuser_reserved: int
	reserved: int  # reserved_connections (PostgreSQL 16+), for roles with pg_use_reserved_connections
	in_use: int  # client backends now
	idle_session_timeout: float  # seconds, 0 = off
	port: int

	@property
	def limit(self) -> int:
		"""Backends that roles without special privileges can open."""
		return self.max_connections - self.superuser_reserved - self.reserved

	@property
	def limit_text(self) -> str:
		text = f"max_connections={self.max_connections} - superuser_reserved_connections={self.superuser_reserved}"
		if self.reserved:
			text += f" - reserved_connections={self.reserved}"
		return f"{text} = {self.limit}"


_SERVER_SQL = """
SELECT current_setting('server_version'), current_setting('max_connections')::int,
	current_setting('superuser_reserved_connections')::int,
	coalesce(current_setting('reserved_connections', true), '0')::int,
	host(inet_server_addr()), inet_server_port(), current_setting('port')::int,
	(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
	coalesce((SELECT setting::float8 / 1000 FROM pg_settings WHERE name = 'idle_session_timeout'), 0)
"""


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
	"""fn() in a thread, given up after `seconds`: through a full session-mode pgBouncer a new client waits."""
	box: dict[str, Any] = {}

	def run() -> None:
		try:
			box["value"] = fn()
		except BaseException as e:
			box["error"] = e

	thread = threading.Thread(target=run, name="frappe_pgpool-doctor", daemon=True)
	thread.start()
	thread.join(seconds)
	if thread.is_alive():
		raise TimeoutError(
			f"no answer within {seconds:g}s (through a full pgBouncer pool a new client waits)"
		)
	if "error" in box:
		raise box["error"]
	return box["value"]


def read_server(connect: Connect, timeout: float = 10.0) -> Server:
	"""max_connections and friends, through any connection to the server (pgBouncer forwards them)."""

	def read() -> Server:
		conn = connect()
		try:
			conn.autocommit = True
			with conn.cursor() as cur:
				cur.execute(_SERVER_SQL)
				version, max_conn, su, reserved, host, inet_port, port, in_use, idle = cur.fetchone()
				try:
					cur.execute("SELECT system_identifier::text FROM pg_control_system()")
					system = cur.fetchone()[0]
				except psycopg2.Error:
					system = None
		finally:
			conn.close()
		name = f"{host}:{inet_port}" if host else f"local socket, port {port}"
		return Server(system or name, name, version.split()[0], max_conn, su, reserved, in_use, idle, port)

	return _within(timeout, read)
