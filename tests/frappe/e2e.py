"""End-to-end support: the bench's sites behind a real pgBouncer, real gunicorn, real HTTP.

For the run, each site's site_config.json is pointed at a pgBouncer (session mode, SCRAM)
that the fixture starts in front of the site's own PostgreSQL; the files are restored after.
PGPOOL_E2E_PG_SUPERUSER (default postgres) must be able to read pg_authid on that server.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2

from frappe_pgpool.testing import cluster
from frappe_pgpool.testing.cluster import PgBouncer, free_port

from .bench import BENCH

# the engine tests' wait, at the Frappe tier's pace: its states come from processes that take seconds
wait_for = functools.partial(cluster.wait_for, within=120.0, every=0.1)


def site_config_path(site: str) -> Path:
	return Path(BENCH, "sites", site, "site_config.json")


def read_site_config(site: str) -> dict:
	return json.loads(site_config_path(site).read_text())


def write_site_config(site: str, config: dict) -> None:
	path = site_config_path(site)
	tmp = path.with_suffix(".tmp")
	tmp.write_text(json.dumps(config, indent=1))
	os.replace(tmp, path)


class ExistingPostgres:
	"""The PostgreSQL server the bench's sites already use, as PgBouncer's upstream."""

	def __init__(self, host: str, port: int) -> None:
		self.host, self.port = host, port
		self.superuser = os.environ.get("PGPOOL_E2E_PG_SUPERUSER", "postgres")

	def connect(self, dbname: str = "postgres"):
		conn = psycopg2.connect(host=self.host, port=self.port, user=self.superuser, dbname=dbname)
		conn.autocommit = True
		return conn

	def query(self, sql: str, args=None) -> list[tuple]:
		with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
			cur.execute(sql, args)
			return cur.fetchall()

	def scram_secret(self, role: str) -> str:
		return self.query("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))[0][0]


@contextlib.contextmanager
def sites_behind_pgbouncer(
	sites: list[str],
	pool_mode: str = "session",
	extra: dict | None = None,
	root: tuple[str, str] | None = None,
):
	"""Start one pgBouncer for the sites and point their configs at it (plus `extra` keys); restore on exit.

	`root` (login, password): Frappe's root connection (reinstall, restore, new-site --force, drop-site)
	goes to the site's db_host and db_port, so through this pgBouncer too; it then knows every user by
	password (the root role has none the server checks, and reinstall re-salts the site user's secret).
	"""
	originals = {site: site_config_path(site).read_text() for site in sites}
	configs = {site: read_site_config(site) for site in sites}
	first = configs[sites[0]]
	upstream = ExistingPostgres(first.get("db_host", "127.0.0.1"), int(first.get("db_port", 5432)))
	users = {c.get("db_user", c["db_name"]): c["db_password"] for c in configs.values()}
	if root:
		users[root[0]] = root[1]
	bouncer = PgBouncer(upstream, users=users, pool_mode=pool_mode, clear_text=root is not None)  # type: ignore[arg-type]
	bouncer.start()
	try:
		for site, config in configs.items():
			write_site_config(
				site,
				{
					**config,
					"db_host": "127.0.0.1",
					"db_port": bouncer.port,
					"db_pool_enabled": 1,
					**(extra or {}),
				},
			)
		yield bouncer, upstream
	finally:
		for site, text in originals.items():
			if site_config_path(site).parent.is_dir():  # not a site the test dropped (drop-site)
				site_config_path(site).write_text(text)
		bouncer.kill()


class PortTaken(Exception):
	"""gunicorn could not bind its port: another process listens there."""


class Gunicorn:
	def __init__(
		self, workers: int = 2, threads: int = 1, preload: bool = True, python: str | None = None
	) -> None:
		self.workers, self.threads, self.preload = workers, threads, preload
		self.python = python  # another environment's interpreter (python -m gunicorn); default: the bench's
		self.port = free_port()
		self.log = Path(BENCH, "logs", f"pgpool-e2e-gunicorn-{self.port}.log")
		self.proc: subprocess.Popen | None = None

	def __enter__(self) -> Gunicorn:
		# free_port() gives the port back before gunicorn binds it, seconds later (after --preload's
		# import): another listener of a concurrent run may take it. Then gunicorn says so and exits,
		# and it is started again on another port; any other exit is an error
		for _ in range(3):
			try:
				return self._start()
			except PortTaken:
				self.port = free_port()
				self.log = Path(BENCH, "logs", f"pgpool-e2e-gunicorn-{self.port}.log")
		return self._start()

	def _start(self) -> Gunicorn:
		args = [
			*(
				[self.python, "-m", "gunicorn"]
				if self.python
				else [str(Path(BENCH, "env", "bin", "gunicorn"))]
			),
			"-b",
			f"127.0.0.1:{self.port}",
			"-w",
			str(self.workers),
		]
		args += ["--threads", str(self.threads)] if self.threads > 1 else []
		args += ["--preload"] if self.preload else []
		args += ["-t", "120", "frappe.app:application"]
		with open(self.log, "w") as log:
			self.proc = subprocess.Popen(args, cwd=Path(BENCH, "sites"), stdout=log, stderr=subprocess.STDOUT)
		deadline = time.monotonic() + 60
		while time.monotonic() < deadline:
			if self.proc.poll() is not None:
				text = self.log.read_text()
				if "Connection in use" in text:
					raise PortTaken(self.port)
				raise RuntimeError(f"gunicorn exited:\n{text[-3000:]}")
			with socket.socket() as s:
				if s.connect_ex(("127.0.0.1", self.port)) == 0 and len(self.worker_pids()) >= self.workers:
					return self
			time.sleep(0.2)
		raise RuntimeError(f"gunicorn did not start:\n{self.log.read_text()[-3000:]}")

	def __exit__(self, *exc: object) -> None:
		if self.proc and self.proc.poll() is None:
			self.proc.send_signal(signal.SIGTERM)
			try:
				self.proc.wait(30)
			except subprocess.TimeoutExpired:
				self.proc.kill()

	def worker_pids(self) -> set[int]:
		assert self.proc is not None
		pids = set()
		for stat in Path("/proc").glob("[0-9]*/stat"):
			with contextlib.suppress(OSError, IndexError, ValueError):
				fields = stat.read_text().rsplit(")", 1)[1].split()
				if int(fields[1]) == self.proc.pid:
					pids.add(int(stat.parent.name))
		return pids

	def request(
		self, path: str, site: str, token: str | None = None, data: dict | None = None
	) -> tuple[int, dict]:
		headers = {"X-Frappe-Site-Name": site, "Accept": "application/json"}
		if token:
			headers["Authorization"] = f"token {token}"
		body = None
		if data is not None:
			body = json.dumps(data).encode()
			headers["Content-Type"] = "application/json"
		req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, headers=headers)
		try:
			with urllib.request.urlopen(req, timeout=60) as resp:
				return resp.status, json.loads(resp.read() or b"{}")
		except urllib.error.HTTPError as e:
			return e.code, json.loads(e.read() or b"{}")

	def each_worker(self, sites: str | list[str], token: str, within: float = 120) -> dict[int, dict]:
		"""frappe_pgpool's status from every worker process, as each reports itself, asked for the sites in
		turn. The kernel decides which worker accepts a request, so the requests go on until every worker
		has answered (one at a time: no more concurrency inside a process than the test's own); `within`
		seconds is a hang detector, not a bound on time."""
		sites = [sites] if isinstance(sites, str) else sites
		pids = self.worker_pids()
		seen: dict[int, dict] = {}
		deadline = time.monotonic() + within
		i = 0
		while not pids <= set(seen):
			assert time.monotonic() < deadline, f"status reached {sorted(seen)} of workers {sorted(pids)}"
			answer = status(self, sites[i % len(sites)], token)
			seen[answer["process_id"]] = answer
			i += 1
		return seen

	def hammer(self, calls: list[tuple], concurrency: int) -> list[tuple[int, dict]]:
		"""Run (path, site, token[, data]) calls with `concurrency` clients; results in call order."""
		with ThreadPoolExecutor(concurrency) as pool:
			return list(pool.map(lambda call: self.request(*call), calls))


def status(web: Gunicorn, site: str, token: str) -> dict:
	"""frappe_pgpool's status as the worker that took the request reports it (System Manager's token)."""
	code, body = web.request("/api/method/frappe_pgpool.api.status", site, token)
	assert code == 200, body
	return body["message"]


def failed_write_rolls_back_and_commits_are_seen(web: Gunicorn, site: str, token: str, marker: str) -> None:
	"""A request that fails after a write leaves nothing; a committed write is seen by the next request."""
	like = f'/api/resource/ToDo?filters=[["description","like","{marker}%"]]'
	code, _ = web.request(
		"/api/method/frappe.client.insert_many",
		site,
		token,
		{"docs": [{"doctype": "ToDo", "description": f"{marker}-rolled-back"}, {"doctype": "ToDo"}]},
	)
	assert code >= 400  # the second ToDo has no description: the request fails after a write
	assert web.request(like, site, token) == (200, {"data": []})
	code, _ = web.request("/api/resource/ToDo", site, token, {"description": f"{marker}-committed"})
	assert code == 200
	code, body = web.request(like, site, token)
	assert code == 200 and len(body["data"]) == 1
