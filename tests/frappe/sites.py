"""Many sites on one real bench: quick sites behind one pgBouncer (or none), and a sampler.

Used by tests/frappe/test_many_sites.py and benchmarks/sites.py. The quick sites themselves come from
frappe_pgpool.testing.sites (copies of FRAPPE_SITE's database). Everything a run changes in the
bench's config files (each site's site_config.json, common_site_config.json) is restored at the end.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg2

from frappe_pgpool.testing.cluster import PgBouncer
from frappe_pgpool.testing.sites import QuickSite

from .bench import BENCH
from .e2e import ExistingPostgres

APP_NAME = re.compile(r"^frappe:(?P<site>.+):(?P<pid>\d+)$")


def common_config_path() -> Path:
	return Path(BENCH, "sites", "common_site_config.json")


def _site_config_path(site: str) -> Path:
	return Path(BENCH, "sites", site, "site_config.json")


def _merge(path: Path, values: dict) -> None:
	"""Merge values into a JSON config file (None removes a key), atomically."""
	data = json.loads(path.read_text())
	for key, value in values.items():
		if value is None:
			data.pop(key, None)
		else:
			data[key] = value
	tmp = path.with_suffix(".tmp")
	tmp.write_text(json.dumps(data, indent=1))
	os.replace(tmp, path)


def set_site_config(sites: list[str], **values) -> None:
	for site in sites:
		_merge(_site_config_path(site), values)


def set_common_config(**values) -> None:
	_merge(common_config_path(), values)


@contextlib.contextmanager
def configs_restored(sites: list[str]):
	"""Restore every given site's site_config.json and common_site_config.json on exit."""
	paths = [*(_site_config_path(s) for s in sites), common_config_path()]
	saved = {p: p.read_text() for p in paths}
	try:
		yield
	finally:
		for path, text in saved.items():
			if path.parent.exists():
				path.write_text(text)


def upstream() -> ExistingPostgres:
	return ExistingPostgres(
		os.environ.get("PGPOOL_PG_HOST", "127.0.0.1"), int(os.environ.get("PGPOOL_PG_PORT", "5432"))
	)


def start_bouncer(sites: list[QuickSite], pool_mode: str = "session", **settings) -> PgBouncer:
	"""A pgBouncer (SCRAM, log_connections) for the sites' users, in front of their PostgreSQL."""
	users = {s.user: s.db_password for s in sites}
	bouncer = PgBouncer(upstream(), users=users, pool_mode=pool_mode, **settings)  # type: ignore[arg-type]
	return bouncer.start()


def point_at(sites: list[str], host: str, port: int) -> None:
	set_site_config(sites, db_host=host, db_port=port)


def logins(bouncer: PgBouncer, dbs: set[str]) -> int:
	"""Client logins pgBouncer completed for these databases so far (its log, log_connections=1)."""
	text = bouncer.read_log()  # raises when unreadable
	return sum(1 for m in re.finditer(r" login attempt: db=(\S+) ", text) if m[1] in dbs)


_LOG_LINE = re.compile(
	r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) (?P<tz>\S+) \[\d+\] LOG (?P<kind>[CS])-(?P<ptr>0x[0-9a-f]+): "
	r"(?P<db>[^/\s]+)/\S+ (?P<msg>.*)$"
)


def connection_timeline(bouncer: PgBouncer, dbs: set[str]) -> list[tuple[float, int, int]]:
	"""Every change of pgBouncer's client and server connection counts for these databases, exactly.

	From its log (log_connections and log_disconnections): a client counts from its login to its
	"closing because", a server from "new connection to server" to its "closing because".
	Returns (unix time, clients, servers) after each change. Samples miss connections that live a
	few milliseconds (plain Frappe's); this does not.
	"""
	import datetime

	lines = bouncer.read_log().splitlines()  # raises when unreadable
	open_: dict[str, set[str]] = {"C": set(), "S": set()}
	timeline = []
	for line in lines:
		m = _LOG_LINE.match(line)
		if m is None or m["db"] not in dbs:
			continue
		kind, ptr, msg = m["kind"], m["ptr"], m["msg"]
		before = len(open_[kind])
		if (kind == "C" and msg.startswith("login attempt")) or (
			kind == "S" and msg.startswith("new connection to server")
		):
			open_[kind].add(ptr)
		elif msg.startswith("closing because"):
			open_[kind].discard(ptr)
		if len(open_[kind]) != before:
			ts = datetime.datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S.%f")
			ts = ts.replace(tzinfo=datetime.timezone.utc) if m["tz"] == "UTC" else ts.astimezone()
			timeline.append((ts.timestamp(), len(open_["C"]), len(open_["S"])))
	return timeline


def timeline_peaks(timeline: list[tuple[float, int, int]], start: float, end: float) -> tuple[int, int]:
	"""Most clients and most servers open at once between two unix times."""
	before = (0, 0)  # the counts in effect at `start`
	inside = []
	for ts, clients, servers in timeline:
		if ts < start:
			before = (clients, servers)
		elif ts <= end:
			inside.append((clients, servers))
	states = [before, *inside]
	return max(c for c, _ in states), max(s for _, s in states)


def backend_sessions(dbs: set[str]) -> int:
	"""Sessions PostgreSQL has started for these databases so far (pg_stat_database.sessions, PG 14+)."""
	rows = upstream().query(
		"SELECT coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname = ANY(%s)", (sorted(dbs),)
	)
	return int(rows[0][0])


def tcp_connections(pids: set[int], port: int) -> dict[int, int]:
	"""Established TCP connections each process has open to `port`, from /proc (the client's own view).

	Exact at the instant it is read, unlike pg_stat_activity, where a backend whose client has just
	closed stays listed until it has exited.

	A table or a process's fd directory that cannot be read raises (never a count of 0); only a
	kernel without IPv6 (no /proc/net/tcp6) and an fd closed between listing and reading it are skipped.
	"""
	established: set[str] = set()
	for table in ("/proc/net/tcp", "/proc/net/tcp6"):
		try:
			text = Path(table).read_text()
		except FileNotFoundError:
			if table.endswith("6"):
				continue
			raise
		for line in text.splitlines()[1:]:
			fields = line.split()
			if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
				established.add(fields[9])  # inode
	counts = {}
	for pid in pids:
		n = 0
		try:
			fds = list(Path(f"/proc/{pid}/fd").iterdir())
		except OSError as e:
			raise AssertionError(f"cannot read the sockets of process {pid}: {e}") from e
		for fd in fds:
			with contextlib.suppress(FileNotFoundError):  # closed since it was listed
				link = os.readlink(fd)
				if link.startswith("socket:[") and link[8:-1] in established:
					n += 1
		counts[pid] = n
	return counts


def worker_of(application_name: str) -> tuple[str, int] | None:
	m = APP_NAME.match(application_name or "")
	return (m["site"], int(m["pid"])) if m else None


class Sampler(threading.Thread):
	"""Samples, every `interval` seconds, what pgBouncer and PostgreSQL see for the given databases.

	Each sample: t (seconds since start); per pid the pooled clients of pgBouncer (SHOW CLIENTS,
	application_name frappe:<site>:<pid>) and the backends in pg_stat_activity by the same name (only the
	connections the pool keeps in session mode are named: sockets=, from /proc, counts them all);
	pgBouncer's SHOW POOLS summed over the databases (cl_active, cl_waiting, sv_active, sv_idle,
	sv_used, sv_tested, sv_login); the databases' PostgreSQL backends.
	"""

	POOL_FIELDS = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")

	def __init__(
		self,
		dbs: set[str],
		bouncer: PgBouncer | None = None,
		interval: float = 0.2,
		sockets: tuple[Callable[[], set[int]], int] | None = None,
	) -> None:
		"""sockets=(pids, port): also count each of those processes' TCP connections to that port."""
		super().__init__(name="many-sites-sampler", daemon=True)
		self.dbs, self.bouncer, self.interval, self.sockets = set(dbs), bouncer, interval, sockets
		self.samples: list[dict] = []
		self.errors: list[str] = []
		self._halt = threading.Event()
		self._started_at = time.monotonic()

	def _admin(self):
		assert self.bouncer is not None
		b = self.bouncer
		conn = psycopg2.connect(b.dsn(b.admin_user, b.admin_password, "pgbouncer"))
		conn.autocommit = True
		return conn

	def run(self) -> None:
		pg = upstream().connect()
		admin = self._admin() if self.bouncer else None
		try:
			while not self._halt.is_set():
				try:
					self.samples.append(self._sample(pg, admin))
				except Exception as e:  # a sample lost is reported, never a crash of the run
					self.errors.append(repr(e))
					with contextlib.suppress(Exception):
						admin = self._admin() if self.bouncer else None
				self._halt.wait(self.interval)
		finally:
			pg.close()
			if admin is not None:
				admin.close()

	def _rows(self, conn, command: str) -> list[dict]:
		with conn.cursor() as cur:
			cur.execute(command)
			names = [d[0] for d in cur.description]
			return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

	def _sample(self, pg, admin) -> dict:
		sample: dict = {"t": round(time.monotonic() - self._started_at, 3)}
		backends = self._rows(
			pg,
			"SELECT datname, application_name, state FROM pg_stat_activity "
			"WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
		)
		mine = [b for b in backends if b["datname"] in self.dbs]
		sample["backends"] = len(mine)
		sample["backends_all"] = len(backends)
		by_pid: dict[int, int] = collections.Counter()
		for b in mine:
			owner = worker_of(b["application_name"])
			if owner:
				by_pid[owner[1]] += 1
		sample["backends_by_pid"] = dict(by_pid)
		if self.sockets is not None:
			pids, port = self.sockets
			sample["sockets_by_pid"] = tcp_connections(pids(), port)
		if admin is not None:
			clients = [c for c in self._rows(admin, "SHOW CLIENTS") if c["database"] in self.dbs]
			by_pid = collections.Counter()
			sites_by_pid: dict[int, set] = collections.defaultdict(set)
			for c in clients:
				owner = worker_of(c.get("application_name", ""))
				if owner:
					by_pid[owner[1]] += 1
					sites_by_pid[owner[1]].add(owner[0])
			sample["clients"] = len(clients)
			sample["clients_by_pid"] = dict(by_pid)
			pools = [p for p in self._rows(admin, "SHOW POOLS") if p["database"] in self.dbs]
			for name in self.POOL_FIELDS:
				sample[name] = sum(int(p.get(name) or 0) for p in pools)
			sample["servers"] = sum(
				sample[n] for n in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
			)
		return sample

	def stop(self) -> list[dict]:
		self._halt.set()
		self.join(10)
		return self.samples

	def _checked(self, name: str) -> list[dict]:
		"""The samples, when every one was taken and each has `name`: a peak over lost or missing samples
		would be a silent zero that passes any upper bound."""
		assert not self.errors, f"the sampler lost {len(self.errors)} sample(s): {self.errors[:3]}"
		assert self.samples, "the sampler took no sample"
		missing = sum(1 for s in self.samples if name not in s)
		assert not missing, f"{missing} of {len(self.samples)} samples have no {name!r}"
		return self.samples

	def peak(self, name: str) -> int:
		return max(s[name] for s in self._checked(name))

	def peak_by_pid(self, name: str) -> dict[int, int]:
		"""Most connections each pid held at once in any sample (clients_, backends_ or sockets_by_pid)."""
		peak: dict[int, int] = {}
		for s in self._checked(name):
			for pid, n in s.get(name, {}).items():
				peak[pid] = max(peak.get(pid, 0), n)
		return peak
