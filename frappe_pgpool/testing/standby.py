"""A real read replica for tests: a physical hot standby of a running PostgreSQL.

`HotStandby(host, port).start()` takes a base backup of the primary with `pg_basebackup -R -X stream`
into a temp dir, starts it with `pg_ctl` on a free loopback port, and checks `pg_is_in_recovery()`.
Replication connections need a `pg_hba.conf` line on the primary: one narrow line (`host replication
<superuser> <host>/32 trust`, marked with a comment) is put first in the primary's hba file and the
configuration reloaded; `stop()` takes exactly that line out again and reloads, so the file is back to
its bytes of before. The standby itself trusts the superuser and asks every other role for its SCRAM
password (roles and their passwords replicate from the primary), so a client with a wrong password is
refused there. No Frappe import. Under root the standby runs as the `postgres` system user.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psycopg2
import psycopg2.extras

from .cluster import STARTUP_TIMEOUT, _demote, _make_dir, _pg_bindir, _server_user, _tail, free_port

HBA_MARK = "# frappe_pgpool HotStandby"
# Settings a hot standby must have at least as high as its primary, or it refuses to start.
_AT_LEAST_PRIMARY = (
	"max_connections",
	"max_worker_processes",
	"max_wal_senders",
	"max_prepared_transactions",
	"max_locks_per_transaction",
)


class HotStandby:
	"""A streaming hot standby of the PostgreSQL at host:port, on a free loopback port."""

	def __init__(
		self, primary_host: str = "127.0.0.1", primary_port: int = 5432, superuser: str = "postgres"
	) -> None:
		self.primary_host, self.primary_port, self.superuser = primary_host, primary_port, superuser
		self.host = "127.0.0.1"
		self.port = free_port()
		self._user = _server_user()
		self._bin = _pg_bindir()
		self.base: Path | None = None
		self.data: Path | None = None
		self.log: Path | None = None
		self._hba_path: Path | None = None
		self._hba_line = ""
		self._started = False
		self.timings: dict[str, float] = {}

	# -- the primary ----------------------------------------------------------------------------

	def primary(self, dbname: str = "postgres") -> psycopg2.extensions.connection:
		conn = psycopg2.connect(
			host=self.primary_host, port=self.primary_port, user=self.superuser, dbname=dbname
		)
		conn.autocommit = True
		return conn

	def primary_execute(self, sql: str, args=None, dbname: str = "postgres") -> list[dict]:
		return _execute(self.primary(dbname), sql, args)

	def _bindir(self) -> Path:
		"""The server binaries of the primary's major version: a standby must run the same one."""
		(row,) = self.primary_execute("SELECT current_setting('server_version_num')::int / 10000 AS major")
		same = Path(f"/usr/lib/postgresql/{row['major']}/bin")
		if not os.environ.get("PGPOOL_PG_BINDIR") and (same / "pg_basebackup").exists():
			return same
		return _pg_bindir()

	def _allow_replication(self) -> None:
		"""Put our one line first in the primary's pg_hba.conf and reload."""
		(row,) = self.primary_execute("SHOW hba_file")
		self._hba_path = Path(row["hba_file"])
		if not os.access(self._hba_path, os.R_OK | os.W_OK):
			raise RuntimeError(
				f"cannot edit the primary's {self._hba_path} to allow replication: run as root, on the "
				"primary's machine"
			)
		text = self._hba_path.read_bytes()
		text = _without_stale_lines(text)
		self._hba_line = (
			f"host replication {self.superuser} {self.host}/32 trust {HBA_MARK} pid={os.getpid()}\n"
		)
		self._write_hba(self._hba_line.encode() + text)
		atexit.register(self._restore_hba)
		self._reload_primary()
		errors = self.primary_execute(
			"SELECT line_number, error FROM pg_hba_file_rules WHERE error IS NOT NULL"
		)
		if errors:
			self._restore_hba()
			raise RuntimeError(f"primary's pg_hba.conf has errors after adding our line: {errors}")

	def _restore_hba(self) -> None:
		"""Take exactly our line out again (lines others added meanwhile stay) and reload."""
		if self._hba_path is None or not self._hba_line:
			return
		text = self._hba_path.read_bytes()
		line = self._hba_line.encode()
		if line in text:
			self._write_hba(text.replace(line, b"", 1))
			self._reload_primary()
		self._hba_line = ""

	def _write_hba(self, content: bytes) -> None:
		# in place: the file keeps its owner and mode
		assert self._hba_path is not None
		with open(self._hba_path, "r+b") as f:
			f.write(content)
			f.truncate()

	def _reload_primary(self) -> None:
		self.primary_execute("SELECT pg_reload_conf()")
		time.sleep(0.1)  # the postmaster rereads the files asynchronously after SIGHUP

	# -- the standby ----------------------------------------------------------------------------

	def _run(self, *args: str, timeout: float = 300) -> None:
		result = subprocess.run(
			[str(self._bin / args[0]), *args[1:]],
			preexec_fn=_demote(self._user),
			capture_output=True,
			text=True,
			timeout=timeout,
			cwd=self.base,
		)
		if result.returncode:
			log = _tail(self.log) if self.log else ""
			raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr}\n{log}")

	def start(self) -> HotStandby:
		started = time.monotonic()
		self._bin = self._bindir()
		self.base = _make_dir("pgpool-standby-", self._user)
		self.data = self.base / "data"
		self.log = self.base / "standby.log"
		atexit.register(self.stop)
		self._allow_replication()
		at_least = {name: self.primary_execute(f"SHOW {name}")[0][name] for name in _AT_LEAST_PRIMARY}
		t = time.monotonic()
		self._run(
			"pg_basebackup",
			"-h",
			self.primary_host,
			"-p",
			str(self.primary_port),
			"-U",
			self.superuser,
			"-D",
			str(self.data),
			"-R",  # standby.signal + primary_conninfo
			"-X",
			"stream",
			"-c",
			"fast",  # an immediate checkpoint instead of waiting for the next one
			"--no-sync",
		)
		self.timings["basebackup"] = time.monotonic() - t
		settings = {
			"listen_addresses": f"'{self.host}'",
			"port": self.port,
			"unix_socket_directories": f"'{self.base}'",
			"hot_standby": "on",
			"fsync": "off",
			"shared_buffers": "32MB",
			"log_connections": "on",
			"log_line_prefix": "'%m [%p] %q%u@%d '",
			"cluster_name": "'pgpool-standby'",
			**at_least,
		}
		block = "".join(f"{k} = {v}\n" for k, v in settings.items())
		# The primary's own postgresql.conf (Debian keeps it in /etc) is not part of the backup;
		# postgresql.auto.conf is, and wins over postgresql.conf: our block goes into both.
		(self.data / "postgresql.conf").write_text(block)
		with open(self.data / "postgresql.auto.conf", "a") as auto:
			auto.write(block)
		(self.data / "pg_hba.conf").write_text(
			f"local all all trust\nhost all {self.superuser} {self.host}/32 trust\n"
			f"host all all {self.host}/32 scram-sha-256\n"
		)
		if self._user is not None:
			for name in ("postgresql.conf", "pg_hba.conf"):
				os.chown(self.data / name, self._user.pw_uid, self._user.pw_gid)
		t = time.monotonic()
		self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
		self._started = True
		(row,) = self.execute("SELECT pg_is_in_recovery() AS r")
		if not row["r"]:
			raise RuntimeError(f"the standby on port {self.port} is not in recovery:\n{_tail(self.log)}")
		self.wait_for_replay()
		self.timings["start"] = time.monotonic() - t
		self.timings["total"] = time.monotonic() - started
		return self

	def stop(self) -> None:
		if self._started:
			self._started = False
			with contextlib.suppress(Exception):
				self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
		self._restore_hba()
		if self.base is not None:
			shutil.rmtree(self.base, ignore_errors=True)
			self.base = None

	def connect(self, dbname: str = "postgres", **kw) -> psycopg2.extensions.connection:
		conn = psycopg2.connect(host=self.host, port=self.port, user=self.superuser, dbname=dbname, **kw)
		conn.autocommit = True
		return conn

	def execute(self, sql: str, args=None, dbname: str = "postgres") -> list[dict]:
		return _execute(self.connect(dbname), sql, args)

	def wait_for_replay(self, timeout: float = STARTUP_TIMEOUT) -> float:
		"""Wait until the standby has replayed everything the primary wrote so far; seconds waited."""
		(row,) = self.primary_execute("SELECT pg_current_wal_lsn()::text AS lsn")
		started = time.monotonic()
		while True:
			(done,) = self.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn AS ok", (row["lsn"],))
			if done["ok"]:
				return time.monotonic() - started
			if time.monotonic() - started > timeout:
				raise RuntimeError(f"standby did not replay up to {row['lsn']} in {timeout:g}s")
			time.sleep(0.02)

	def backends(self, dbname: str | None = None) -> list[dict]:
		"""Client backends on the standby (not ours): pid, usename, datname, application_name."""
		rows = self.execute(
			"SELECT pid, usename, datname, application_name, backend_start, state FROM pg_stat_activity "
			"WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
		)
		return [r for r in rows if dbname is None or r["datname"] == dbname]

	def logins(self, user: str | None = None, dbname: str | None = None) -> int:
		"""Completed logins on the standby so far (log_connections), optionally of one user/database."""
		try:
			text = self.log.read_text(errors="replace") if self.log else ""
		except OSError:
			return 0
		user_re = re.escape(user) if user else r"\S+"
		db_re = re.escape(dbname) if dbname else r"\S+"
		return len(re.findall(rf"connection authorized: user={user_re} database={db_re}[ \n]", text))

	def __enter__(self) -> HotStandby:
		return self.start()

	def __exit__(self, *exc: object) -> None:
		self.stop()


def _execute(conn, sql: str, args=None) -> list[dict]:
	with contextlib.closing(conn), conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
		cur.execute(sql, args)
		return [dict(row) for row in cur.fetchall()] if cur.description else []


def _without_stale_lines(text: bytes) -> bytes:
	"""Drop lines a HotStandby of a process that no longer exists left behind (it was killed)."""
	kept = []
	for line in text.splitlines(keepends=True):
		match = re.search(rb"# frappe_pgpool HotStandby pid=(\d+)", line)
		if match and not _alive(int(match.group(1))):
			continue
		kept.append(line)
	return b"".join(kept)


def _alive(pid: int) -> bool:
	try:
		os.kill(pid, 0)
	except ProcessLookupError:
		return False
	except PermissionError:
		return True
	return True
