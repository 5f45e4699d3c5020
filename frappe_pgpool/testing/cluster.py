"""Throwaway real servers for tests, the demo and benchmarks: a PostgreSQL cluster and a pgBouncer.

Both listen on free loopback ports (and on unix sockets in their own temp dir), log to files
there, and are stopped and removed on exit. No Frappe import. PostgreSQL and pgBouncer refuse
to run as root, so under root they run as the `postgres` system user (PGPOOL_SERVER_USER).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2
import psycopg2.extras

from ..doctor import admin_rows

STARTUP_TIMEOUT = 20.0


def free_port() -> int:
	with socket.socket() as s:
		s.bind(("127.0.0.1", 0))
		return s.getsockname()[1]


def _pg_bindir() -> Path:
	if os.environ.get("PGPOOL_PG_BINDIR"):
		return Path(os.environ["PGPOOL_PG_BINDIR"])
	for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
		if (candidate / "initdb").exists():
			return candidate
	found = shutil.which("initdb")
	if found:
		return Path(found).resolve().parent
	raise RuntimeError("PostgreSQL server binaries (initdb) not found; set PGPOOL_PG_BINDIR")


def _pgbouncer_bin() -> str:
	found = os.environ.get("PGPOOL_PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
	if not os.path.exists(found):
		raise RuntimeError("pgbouncer not found: apt-get install pgbouncer, or set PGPOOL_PGBOUNCER")
	return found


def _server_user() -> pwd.struct_passwd | None:
	"""The account servers run as: None for ourselves, else an unprivileged one when we are root."""
	if os.geteuid() != 0:
		return None
	return pwd.getpwnam(os.environ.get("PGPOOL_SERVER_USER", "postgres"))


def _demote(user: pwd.struct_passwd | None):
	if user is None:
		return None

	def preexec() -> None:
		os.setgid(user.pw_gid)
		os.setuid(user.pw_uid)

	return preexec


def _make_dir(prefix: str, user: pwd.struct_passwd | None) -> Path:
	path = Path(tempfile.mkdtemp(prefix=prefix))
	if user is not None:
		os.chown(path, user.pw_uid, user.pw_gid)
	return path


def _tail(path: Path, lines: int = 30) -> str:
	try:
		return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
	except OSError:
		return "(no log)"


HANG = 60.0  # seconds: how long an operation may stay blocked before a test calls it a hang


def wait_for(
	predicate: Callable[[], object],
	what: str | Callable[[], str] = "the awaited state",
	within: float = HANG,
	every: float = 0.005,
) -> None:
	"""Poll until predicate() holds: a hang detector at `within` seconds, never a speed bound.

	For a state another thread, process, pgBouncer or PostgreSQL reaches in its own time (a slot freed, a
	server dropped, a waiter queued): wait for the state itself, not for a sleep guessed to be long enough.
	`what` names it in the failure (a callable is called then, e.g. to show pgBouncer's view).
	"""
	deadline = time.monotonic() + within
	while not predicate():
		if time.monotonic() > deadline:
			detail = what() if callable(what) else what
			raise AssertionError(f"still not reached after {within:.0f} s: {detail}")
		time.sleep(every)


def _wait_for_port(port: int, proc: subprocess.Popen | None, log: Path, what: str) -> None:
	deadline = time.monotonic() + STARTUP_TIMEOUT
	while time.monotonic() < deadline:
		if proc is not None and proc.poll() is not None:
			raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
		with socket.socket() as s:
			if s.connect_ex(("127.0.0.1", port)) == 0:
				return
		time.sleep(0.05)
	raise RuntimeError(f"{what} did not listen on port {port} within {STARTUP_TIMEOUT:g}s:\n{_tail(log)}")


def _conf_value(value: object) -> str:
	"""A postgresql.conf value: numbers as they are, anything else a quoted string."""
	if isinstance(value, (int, float)) and not isinstance(value, bool):
		return str(value)
	return "'" + str(value).replace("'", "''") + "'"


class PostgresCluster:
	"""A fresh cluster from initdb: trust auth on loopback, SCRAM-hashed passwords for pgBouncer."""

	host = "127.0.0.1"

	def __init__(
		self,
		base_dir: str | None = None,
		port: int | None = None,
		bindir: str | os.PathLike | None = None,
		settings: dict[str, object] | None = None,
	) -> None:
		"""bindir: the server binaries (default: PGPOOL_PG_BINDIR, else the newest installed); settings:
		postgresql.conf lines added at initdb (e.g. {"reserved_connections": 5})."""
		self._user = _server_user()
		self.superuser = self._user.pw_name if self._user else pwd.getpwuid(os.geteuid()).pw_name
		self.base = Path(base_dir) if base_dir else _make_dir("pgpool-pg-", self._user)
		self.data = self.base / "data"
		self.socket_dir = str(self.base)
		self.log = self.base / "postgres.log"
		self.port = port or free_port()
		self._bin = Path(bindir) if bindir else _pg_bindir()
		self._settings = dict(settings or {})
		self._started = False

	def _run(self, *args: str) -> None:
		result = subprocess.run(
			[str(self._bin / args[0]), *args[1:]],
			preexec_fn=_demote(self._user),
			capture_output=True,
			text=True,
			timeout=120,
			cwd=self.base,
		)
		if result.returncode:
			raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr}\n{_tail(self.log)}")

	def start(self) -> PostgresCluster:
		if not self.data.exists():
			self._run(
				"initdb", "-D", str(self.data), "-A", "trust", "-U", self.superuser, "--no-sync", "-E", "UTF8"
			)
			with open(self.data / "postgresql.conf", "a") as conf:
				conf.write(
					f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.socket_dir}'\n"
					"fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n"
					"shared_buffers = 32MB\npassword_encryption = 'scram-sha-256'\n"
				)
				conf.writelines(f"{name} = {_conf_value(value)}\n" for name, value in self._settings.items())
		self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
		self._started = True
		atexit.register(self.stop)
		return self

	def stop(self, mode: str = "fast") -> None:
		if self._started:
			self._started = False
			self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

	def restart(self, mode: str = "fast") -> None:
		self._run(
			"pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w", "-t", "60", "restart"
		)

	def connect(self, dbname: str = "postgres", **kw) -> psycopg2.extensions.connection:
		conn = psycopg2.connect(host=self.host, port=self.port, user=self.superuser, dbname=dbname, **kw)
		conn.autocommit = True
		return conn

	def execute(self, sql: str, args=None, dbname: str = "postgres") -> list[dict]:
		with (
			contextlib.closing(self.connect(dbname)) as conn,
			conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur,
		):
			cur.execute(sql, args)
			return [dict(row) for row in cur.fetchall()] if cur.description else []

	def create_role(self, name: str, password: str) -> None:
		self.execute(f'CREATE ROLE "{name}" LOGIN PASSWORD %s', (password,))

	def create_database(self, name: str, owner: str) -> None:
		self.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')

	def scram_secret(self, role: str) -> str:
		return self.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))[0]["rolpassword"]

	def backends(self, dbname: str | None = None) -> list[dict]:
		rows = self.execute(
			"SELECT pid, usename, datname, application_name, backend_start, state FROM pg_stat_activity "
			"WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
		)
		return [r for r in rows if dbname is None or r["datname"] == dbname]

	def terminate_backends(self, usename: str | None = None, dbname: str | None = None) -> list[int]:
		"""Signal the backends to end; their pids. They exit in their own time, after this returns."""
		rows = self.execute(
			"SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'client backend' "
			"AND pid <> pg_backend_pid() AND (%s IS NULL OR usename = %s) AND (%s IS NULL OR datname = %s)",
			(usename, usename, dbname, dbname),
		)
		return [r["pid"] for r in rows]

	def __enter__(self) -> PostgresCluster:
		return self.start()

	def __exit__(self, *exc: object) -> None:
		self.stop("immediate")
		shutil.rmtree(self.base, ignore_errors=True)


class PgBouncer:
	"""pgBouncer in the foreground as our child, so tests can signal, restart and kill it."""

	host = "127.0.0.1"
	admin_user = "pgbadmin"
	admin_password = "pgbadmin-pw"

	def __init__(
		self,
		cluster: PostgresCluster,
		users: dict[str, str] | None = None,
		pool_mode: str = "session",
		auth_type: str = "scram-sha-256",
		port: int | None = None,
		clear_text: bool = False,
		**settings: object,
	) -> None:
		self.cluster = cluster
		self.users = dict(users or {})
		# the auth file holds the passwords themselves, not the server's SCRAM secrets: pgBouncer then
		# logs in to the server with the password (a role the server trusts, or one whose secret changes)
		self.clear_text = clear_text
		self.pool_mode = pool_mode
		self.auth_type = auth_type
		self.settings = settings
		self._user = _server_user()
		self.base = _make_dir("pgpool-bouncer-", self._user)
		self.socket_dir = str(self.base)
		self.log = self.base / "pgbouncer.log"
		self.ini = self.base / "pgbouncer.ini"
		self.port = port or free_port()
		self.proc: subprocess.Popen | None = None

	def _secret(self, user: str, password: str) -> str:
		if self.clear_text:
			return password
		if self.auth_type == "scram-sha-256" and user in self.users:
			return self.cluster.scram_secret(user)  # clients must do a real SCRAM exchange
		if self.auth_type == "md5":
			return "md5" + hashlib.md5((password + user).encode()).hexdigest()
		return password

	def _write_config(self) -> None:
		users = {**self.users, self.admin_user: self.admin_password}
		userlist = "".join(f'"{u}" "{self._secret(u, p)}"\n' for u, p in users.items())
		(self.base / "userlist.txt").write_text(userlist)
		settings = {
			"listen_addr": self.host,
			"listen_port": self.port,
			"unix_socket_dir": self.socket_dir,
			"auth_type": self.auth_type,
			"auth_file": str(self.base / "userlist.txt"),
			"admin_users": self.admin_user,
			"stats_users": self.admin_user,
			"pool_mode": self.pool_mode,
			"max_client_conn": 500,
			"default_pool_size": 50,
			"logfile": str(self.log),
			"pidfile": str(self.base / "pgbouncer.pid"),
			"log_connections": 1,
			"log_disconnections": 1,
			"ignore_startup_parameters": "extra_float_digits,options",
			"server_login_retry": 1,
			**self.settings,
		}
		ini = "[databases]\n"
		ini += f"* = host={self.cluster.host} port={self.cluster.port} user=\n".replace(" user=\n", "\n")
		ini += "[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
		self.ini.write_text(ini)
		if self._user is not None:
			for path in (self.ini, self.base / "userlist.txt"):
				os.chown(path, self._user.pw_uid, self._user.pw_gid)

	def start(self) -> PgBouncer:
		self._write_config()
		self.proc = subprocess.Popen(
			[_pgbouncer_bin(), str(self.ini)],
			preexec_fn=_demote(self._user),
			stdout=subprocess.DEVNULL,
			stderr=subprocess.DEVNULL,
			cwd=self.base,
		)
		_wait_for_port(self.port, self.proc, self.log, "pgbouncer")
		atexit.register(self.kill)
		return self

	def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> None:
		if self.proc is None or self.proc.poll() is not None:
			return
		self.proc.send_signal(sig)
		try:
			self.proc.wait(timeout)
		except subprocess.TimeoutExpired:
			self.proc.kill()
			self.proc.wait(5)

	def restart(self, sig: int = signal.SIGINT) -> None:
		self.stop(sig)
		self.start()

	def kill(self) -> None:
		if self.proc is not None and self.proc.poll() is None:
			self.proc.kill()
			self.proc.wait(5)

	def dsn(self, user: str, password: str, dbname: str | None = None, **extra: object) -> str:
		parts = {
			"host": self.host,
			"port": self.port,
			"user": user,
			"password": password,
			"dbname": dbname or user,
		}
		parts.update(extra)
		return " ".join(f"{k}='{v}'" for k, v in parts.items())

	def connect(
		self, user: str, password: str, dbname: str | None = None, **kw
	) -> psycopg2.extensions.connection:
		return psycopg2.connect(self.dsn(user, password, dbname), **kw)

	def admin(self, command: str) -> list[dict]:
		"""Run one admin-console command on a fresh connection (robust across restarts)."""
		return admin_rows(
			lambda: psycopg2.connect(self.dsn(self.admin_user, self.admin_password, "pgbouncer")), command
		)

	def stats(self, dbname: str, *, missing_ok: bool = False) -> dict | None:
		"""pgBouncer's SHOW STATS row for `dbname`.

		A database pgBouncer does not list raises (a made-up zero row would let "nothing was sent" pass
		without measuring anything); a caller for which "no client has connected yet" is a legitimate
		state says so with missing_ok=True and gets None.
		"""
		rows = self.admin("SHOW STATS")
		for row in rows:
			if row["database"] == dbname:
				return row
		if missing_ok:
			return None
		raise AssertionError(
			f"pgBouncer's SHOW STATS lists no database {dbname!r} (it lists {[r['database'] for r in rows]})"
		)

	def read_log(self) -> str:
		"""pgBouncer's log; one that cannot be read fails the caller (never an empty log: counts read
		from it would be zeros that pass every "at most N" assertion)."""
		try:
			return self.log.read_text(errors="replace")
		except OSError as e:
			raise AssertionError(f"cannot read pgBouncer's log {self.log}: {e}") from e

	def _log_count(self, pattern: str) -> int:
		return len(re.findall(pattern, self.read_log()))

	def logins(self, dbname: str) -> int:
		"""Successful client logins to `dbname` so far (across restarts: the log is appended).

		pgBouncer 1.18's SHOW STATS has no login counter; with log_connections=1 it logs one
		"login attempt: db=X user=Y" line per client that completed authentication.
		"""
		return self._log_count(
			rf"C-0x[0-9a-f]+: {re.escape(dbname)}/\S+@\S+ login attempt: db={re.escape(dbname)} "
		)

	def server_connections_opened(self, dbname: str) -> int:
		"""New server connections (Postgres backends) pgBouncer opened for `dbname`."""
		return self._log_count(rf"S-0x[0-9a-f]+: {re.escape(dbname)}/\S+@\S+ new connection to server")

	def clients(self) -> list[dict]:
		return self.admin("SHOW CLIENTS")

	def __enter__(self) -> PgBouncer:
		return self.start()

	def __exit__(self, *exc: object) -> None:
		self.kill()
		shutil.rmtree(self.base, ignore_errors=True)
