"""Armed wherever Frappe runs: container-shaped installs, rebuilt venvs, and the hooks' fallback.

On the real bench (FRAPPE_BENCH_PATH), with the real bench CLI entry point and real pgBouncer:

- container-shaped: the bench's env plays the image (what `bench get-app` installed, nothing
  written into it at run time); `install-app` runs from a hardlinked copy of it (the create-site
  job container), which is then deleted; gunicorn and an RQ worker start from the image.
- rebuilt: a new venv, the app installed into it by pip alone (no bench, no install-app).
- fallback: every start-time arming removed; the before_request / before_job hooks arm each process
  late, and say so once.

Each test restores what it moved; the copies it makes live under the bench and are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .bench import BENCH, PRELUDE, RESULT_MARK, SITE, requires_bench, run_in_bench
from .e2e import Gunicorn, read_site_config, sites_behind_pgbouncer

pytestmark = [pytest.mark.frappe, requires_bench]
SITE2 = os.environ.get("FRAPPE_SITE2", "") or SITE
BENCH_PYTHON = Path(BENCH, "env", "bin", "python")
PTH = "frappe_pgpool_arm.pth"
LEGACY_PTH = "frappe_pgpool_autoload.pth"
LEGACY_LINE = (
	"import importlib.util as _u; "
	"_u.find_spec('frappe_pgpool') and __import__('frappe_pgpool.bootstrap').bootstrap.arm()\n"
)
UNARMED_LINE = re.compile(r"frappe_pgpool: (\w+) process (\d+) was not armed at start: (.*)")


def run_python(python: Path, code: str, site: str, timeout: float = 300) -> tuple[list, str]:
	"""Run code with another environment's Python in sites/; (its out() values, its stderr)."""
	with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
		f.write(PRELUDE + textwrap.dedent(code))
	try:
		result = subprocess.run(
			[str(python), f.name],
			cwd=Path(BENCH, "sites"),
			capture_output=True,
			text=True,
			timeout=timeout,
			env={**os.environ, "FRAPPE_SITE": site},
		)
	finally:
		os.unlink(f.name)
	assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
	values = [
		json.loads(line[len(RESULT_MARK) :])
		for line in result.stdout.splitlines()
		if line.startswith(RESULT_MARK)
	]
	return values, result.stderr


def bench_from(python: Path, *args: str, site: str) -> str:
	"""`bench --site SITE ARGS` run by that environment's Python, as the bench CLI does."""
	result = subprocess.run(
		[str(python), "-m", "frappe.utils.bench_helper", "frappe", "--site", site, *args],
		cwd=Path(BENCH, "sites"),
		capture_output=True,
		text=True,
		timeout=600,
	)
	assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
	return result.stdout


def site_packages(python: Path) -> Path:
	out = subprocess.run(
		[str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
		capture_output=True,
		text=True,
		check=True,
	)
	return Path(out.stdout.strip())


def owned_by_the_package(sp: Path) -> set[str]:
	"""Top-level names in site-packages that the installed frappe_pgpool distribution recorded."""
	names = set()
	for dist in sp.glob("frappe_pgpool-*.dist-info"):
		names.add(dist.name)
		for line in (dist / "RECORD").read_text().splitlines():
			names.add(line.split(",")[0].split("/")[0])
	return names


def arming_pth_files(sp: Path) -> list[Path]:
	"""Every .pth that imports frappe_pgpool at start (not the editable install's plain path entry)."""
	return [
		p
		for p in sp.glob("*.pth")
		if any(line.startswith("import") and "frappe_pgpool" in line for line in p.read_text().splitlines())
	]


def listing(sp: Path) -> set[str]:
	return {p.name for p in sp.iterdir() if p.name != "__pycache__"}


@contextlib.contextmanager
def moved_aside(paths: list[Path]):
	"""Take files out of site-packages for the test; put them back whatever happens."""
	keep = Path(tempfile.mkdtemp(prefix="pgpool-aside-", dir=BENCH))
	moved = []
	try:
		for path in paths:
			target = keep / path.name
			shutil.move(str(path), str(target))
			moved.append((target, path))
		yield
	finally:
		for target, path in moved:
			shutil.move(str(target), str(path))
		shutil.rmtree(keep, ignore_errors=True)


@contextlib.contextmanager
def image_env():
	"""The bench's env as `bench get-app` left it: arming files that install-app wrote are set aside."""
	sp = site_packages(BENCH_PYTHON)
	owned = owned_by_the_package(sp)
	with moved_aside([p for p in arming_pth_files(sp) if p.name not in owned]):
		yield sp


@contextlib.contextmanager
def env_copy(name: str):
	"""A copy of the bench's env (hardlinks: install steps replace files, never write into them)."""
	path = Path(BENCH, f".pgpool-test-{name}")
	shutil.rmtree(path, ignore_errors=True)
	subprocess.run(["cp", "-al", str(Path(BENCH, "env")), str(path)], check=True)
	try:
		yield path / "bin" / "python"
	finally:
		shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def rebuilt_env():
	"""A venv made anew, holding Frappe's dependencies but nothing of frappe_pgpool.

	Frappe's own packages are hardlinked from the bench's env rather than downloaded again (that is
	not what is under test); frappe_pgpool's files, and anything named after it, are left out.
	"""
	path = Path(BENCH, ".pgpool-test-rebuilt-env")
	shutil.rmtree(path, ignore_errors=True)
	base = subprocess.run(
		[str(BENCH_PYTHON), "-c", "import sys; print(sys._base_executable)"],
		capture_output=True,
		text=True,
		check=True,
	).stdout.strip()
	subprocess.run([base, "-m", "venv", str(path)], check=True)
	python = path / "bin" / "python"
	try:
		old, new = site_packages(BENCH_PYTHON), site_packages(python)
		skip = owned_by_the_package(old) | listing(new)
		for entry in old.iterdir():
			if entry.name in skip or "frappe_pgpool" in entry.name or entry.name == "__pycache__":
				continue
			subprocess.run(["cp", "-al", str(entry), str(new / entry.name)], check=True)
		yield python
	finally:
		shutil.rmtree(path, ignore_errors=True)


def warm_hooks(*sites: str) -> None:
	"""Hooks as a running bench has them: read from this code's hooks.py and cached in Redis.

	A bench reused across code changes may cache old ones; and with none cached (install-app and
	migrate clear them), the first request of a worker imports every app's hooks.py, so the app
	itself, to compute them: that arms it by accident of timing, not by design.
	"""
	for site in sites:
		run_in_bench(
			"""
			import frappe
			frappe.init(site=SITE)
			frappe.cache.delete_value("app_hooks")
			out(frappe.get_hooks("before_request"))
			""",
			site=site,
		)


@pytest.fixture(scope="module", autouse=True)
def current_hooks():
	warm_hooks(*{SITE, SITE2})


def db_name(site: str) -> str:
	return read_site_config(site)["db_name"]


def redis_cache() -> str:
	return json.loads(Path(BENCH, "sites", "common_site_config.json").read_text())["redis_cache"]


def published(python: Path, site: str, pids: set[int], timeout: float = 15) -> dict[int, dict]:
	"""The reports that `pids` published to Redis (what bench pgpool status reads), by pid."""
	deadline = time.monotonic() + timeout
	while True:
		(reports,), _ = run_python(
			python,
			f"from frappe_pgpool import publish\nout(publish.collect({redis_cache()!r}, SITE))\n",
			site,
		)
		mine = {r["pid"]: r for r in reports if r["pid"] in pids}
		if set(mine) == pids or time.monotonic() > deadline:
			return mine
		time.sleep(0.5)


ENQUEUE = """
import frappe
frappe.init(site=SITE); frappe.connect()
for _ in range({n}):
	frappe.enqueue("frappe.client.get_count", doctype="ToDo", queue="short")
frappe.db.commit(); frappe.destroy()
out({n})
"""

# A real RQ worker that runs every job in its own process (no fork per job), as a long-lived
# worker does; started with the environment's Python, so nothing imports frappe_pgpool at start
# but what that environment arms.
SIMPLE_WORKER = """
import os, sys
import frappe
from rq import SimpleWorker
from frappe.utils.background_jobs import get_redis_conn, get_queue_list
with frappe.init_site():
	conn = get_redis_conn()
	queues = get_queue_list(["short"], build_queue_name=True)
SimpleWorker(queues, connection=conn).work(burst=True)
bootstrap = sys.modules.get("frappe_pgpool.bootstrap")
out(dict(pid=os.getpid(), armed=bootstrap.armed() if bootstrap else "not imported"))
"""


def serve(python: Path | None, site: str, bouncer, pings: int = 300) -> dict:
	"""gunicorn (2 sync workers) and an RQ worker from `python`'s environment; logins they cost."""
	db = db_name(site)
	before = bouncer.logins(db)
	with Gunicorn(workers=2, python=str(python) if python else None) as web:
		codes = {code for code, _ in web.hammer([("/api/method/ping", site, None)] * pings, concurrency=4)}
		pids = web.worker_pids()
		web_logins = bouncer.logins(db) - before
		clients = sorted(c["application_name"] for c in bouncer.clients() if c["database"] == db)
		reports = published(python or BENCH_PYTHON, site, pids)
		log = web.log
	assert codes == {200}
	run_python(python or BENCH_PYTHON, ENQUEUE.format(n=50), site)
	before = bouncer.logins(db)
	(worker,), worker_stderr = run_python(python or BENCH_PYTHON, SIMPLE_WORKER, site)
	return dict(
		pids=pids,
		web_logins=web_logins,
		clients=clients,
		armed={pid: r.get("armed") for pid, r in reports.items()},
		reports=reports,
		log=log.read_text(errors="replace"),
		job_logins=bouncer.logins(db) - before,
		worker=worker,
		worker_stderr=worker_stderr,
	)


def test_container_shaped_install_pools_every_process_from_its_first_request():
	"""Image with bench get-app; install-app in a throwaway job copy; web and worker from the image."""
	with image_env() as sp:
		image = listing(sp)
		with env_copy("job-env") as job_python:
			job_sp = site_packages(job_python)
			(job_sp / LEGACY_PTH).write_text(LEGACY_LINE)  # left by an older version's install-app
			job_before = listing(job_sp) - {LEGACY_PTH}
			install_out = bench_from(job_python, "install-app", "frappe_pgpool", "--force", site=SITE2)
			after_install = listing(job_sp)
			# migrate removes a stale one too
			(job_sp / LEGACY_PTH).write_text(LEGACY_LINE)
			bench_from(job_python, "migrate", "--skip-search-index", site=SITE2)
			after_migrate = listing(job_sp)
			# bench remove-app runs (uv) pip uninstall: nothing of the app may stay behind
			uv = Path(BENCH, ".bench-cli", "bin", "uv")
			if uv.exists():
				remove = [str(uv), "pip", "uninstall", "-q", "--python", str(job_python), "frappe_pgpool"]
			else:
				remove = [str(job_python), "-m", "pip", "uninstall", "-q", "-y", "frappe_pgpool"]
			subprocess.run(remove, check=True)
			left_after_remove = [n for n in listing(job_sp) if "frappe_pgpool" in n.lower()]
		warm_hooks(SITE2)  # as once the site has served for a while
		image_after = listing(sp)
		with sites_behind_pgbouncer([SITE2]) as (bouncer, _):
			got = serve(None, SITE2, bouncer)
	print(
		f"\ncontainer-shaped: 300 pings on 2 gunicorn workers -> {got['web_logins']} pgBouncer logins; "
		f"50 jobs in one RQ worker -> {got['job_logins']}; armed {got['armed']} / worker {got['worker']}"
	)
	assert got["web_logins"] <= len(got["pids"])  # one per worker, not one per request
	assert got["clients"] == sorted(f"frappe:{SITE2}:{pid}" for pid in got["pids"])  # SHOW CLIENTS
	assert got["armed"] == {pid: "start" for pid in got["pids"]}
	assert got["job_logins"] == 1 and got["worker"]["armed"] == "start"
	assert not UNARMED_LINE.search(got["log"] + got["worker_stderr"])
	assert image_after == image  # nothing was written into the image's site-packages
	assert "pool enabled for" in install_out
	assert after_install == job_before  # install-app wrote nothing, and removed the stale .pth
	assert f"removed {job_sp / LEGACY_PTH}" in install_out
	assert after_migrate == job_before
	assert left_after_remove == []


def test_a_venv_rebuilt_from_scratch_with_the_app_installed_by_pip_alone_is_armed():
	with rebuilt_env() as python:
		subprocess.run(
			[
				str(python),
				"-m",
				"pip",
				"install",
				"-q",
				"--no-deps",
				str(Path(BENCH, "apps", "frappe_pgpool")),
			],
			check=True,
			capture_output=True,
		)
		sp = site_packages(python)
		shipped = (sp / PTH).exists(), (sp / LEGACY_PTH).exists()
		with sites_behind_pgbouncer([SITE]) as (bouncer, _):
			got = serve(python, SITE, bouncer)
	print(
		f"\nrebuilt venv, pip install: 300 pings on 2 workers -> {got['web_logins']} logins; "
		f"50 jobs -> {got['job_logins']}; armed {got['armed']}"
	)
	assert got["web_logins"] <= len(got["pids"])
	assert got["armed"] == {pid: "start" for pid in got["pids"]}
	assert got["job_logins"] == 1 and got["worker"]["armed"] == "start"
	assert shipped == (True, False)


def with_stale_session(web: Gunicorn, site: str, n: int) -> set[int]:
	"""n pings carrying an unknown sid cookie: Frappe looks the session up in the database while it
	builds the request (HTTPRequest), before any before_request hook runs, as for a session that
	expired from the cache."""

	def one(i: int) -> int:
		req = urllib.request.Request(
			f"http://127.0.0.1:{web.port}/api/method/ping",
			headers={"X-Frappe-Site-Name": site, "Cookie": f"sid=pgpool-stale-{i}"},
		)
		with urllib.request.urlopen(req, timeout=60) as resp:
			return resp.status

	with ThreadPoolExecutor(4) as pool:
		return set(pool.map(one, range(n)))


def test_without_start_arming_the_hooks_arm_each_process_and_say_so_once():
	sp = site_packages(BENCH_PYTHON)
	with moved_aside(arming_pth_files(sp)):
		(loaded,), _ = run_python(BENCH_PYTHON, "import sys\nout('frappe_pgpool' in sys.modules)\n", SITE)
		assert loaded is False  # nothing arms this environment at start now
		with sites_behind_pgbouncer([SITE]) as (bouncer, _):
			got = serve(None, SITE, bouncer)
			db = db_name(SITE)
			before = bouncer.logins(db)
			with Gunicorn(workers=2) as web:
				codes = with_stale_session(web, SITE, 100)
				stale_pids = web.worker_pids()
				stale_logins = bouncer.logins(db) - before
			stale_log = web.log.read_text(errors="replace")
	lines = [m.groups() for m in UNARMED_LINE.finditer(got["log"])]
	stale_lines = [m.groups() for m in UNARMED_LINE.finditer(stale_log)]
	print(
		f"\nhook fallback: 300 pings on 2 workers -> {got['web_logins']} logins; 50 jobs -> {got['job_logins']}; "
		f"100 requests with a stale session cookie on 2 fresh workers -> {stale_logins} logins"
	)
	print("\n".join(m.group(0) for m in UNARMED_LINE.finditer(got["log"] + got["worker_stderr"] + stale_log)))
	# a ping queries nothing before before_request: armed there, each worker pools from its first query
	assert got["web_logins"] <= len(got["pids"])
	assert got["armed"] == {pid: "hook" for pid in got["pids"]}
	assert sorted((role, int(pid)) for role, pid, _ in lines) == sorted(("web", pid) for pid in got["pids"])
	assert all(f"before_request hook of site {SITE}" in why and PTH in why for _, _, why in lines)
	# a job: before_job runs before the job's first query, so every job is pooled
	assert got["worker"]["armed"] == "hook" and got["job_logins"] == 1
	(worker_line,) = UNARMED_LINE.findall(got["worker_stderr"])
	assert int(worker_line[1]) == got["worker"]["pid"] and "before_job hook" in worker_line[2]
	# a session looked up before the hook: that first request keeps its plain connection, the
	# worker's next ones share one pooled connection: two logins per worker, one log line each
	assert codes == {200}
	assert sorted(int(pid) for _, pid, _ in stale_lines) == sorted(stale_pids)
	assert all("its first request went unpooled" in why for _, _, why in stale_lines)
	assert stale_logins == 2 * len(stale_lines)


def test_a_bench_command_arms_at_start_without_the_pth():
	"""Every bench command imports the app's commands before Frappe's PostgreSQL module, and that import
	arms (importing the package itself arms nothing): so `bench worker`, `bench execute`, `migrate` and the
	scheduler arm at start even in an environment whose .pth did not run."""
	sp = site_packages(BENCH_PYTHON)
	with moved_aside(arming_pth_files(sp)):
		printed = bench_from(BENCH_PYTHON, "execute", "frappe_pgpool.bootstrap.armed", site=SITE)
	assert json.loads(printed.strip().splitlines()[-1]) == "start", printed


def test_every_interpreter_of_the_bench_env_is_armed_without_importing_wrapt():
	(state,), _ = run_python(
		BENCH_PYTHON,
		"""
		import sys
		mods = set(sys.modules)
		out(dict(
			heavy=sorted(m for m in ("wrapt", "asyncio", "importlib.metadata") if m in mods),
			finder=type(sys.meta_path[0]).__module__ + "." + type(sys.meta_path[0]).__qualname__,
		))
		""",
		SITE,
	)
	assert state == {"heavy": [], "finder": "frappe_pgpool.bootstrap._Trigger"}, (
		f"{state}: was the app installed into {BENCH}/env before its build backend shipped {PTH}? "
		"Install it again (bench setup requirements, or uv pip install -e apps/frappe_pgpool)"
	)


def test_a_process_kept_unarmed_says_so_and_reports_armed_no(monkeypatch):
	assert read_site_config(SITE).get("db_pool_enabled") == 1
	monkeypatch.setenv("FRAPPE_PGPOOL_DISABLE_PATCH", "1")
	with Gunicorn(workers=2) as web:
		codes = {code for code, _ in web.hammer([("/api/method/ping", SITE, None)] * 40, concurrency=4)}
		pids = web.worker_pids()
		reports = published(BENCH_PYTHON, SITE, pids)
	log = web.log.read_text(errors="replace")
	assert codes == {200}
	assert {pid: r["armed"] for pid, r in reports.items()} == {pid: "no" for pid in pids}
	assert all(r["pools"] == [] for r in reports.values())
	lines = re.findall(
		r"frappe_pgpool: web process (\d+) serves site (\S+) \(db_pool_enabled\) unpooled: (.*)", log
	)
	assert sorted(int(pid) for pid, _, _ in lines) == sorted(pids)
	assert all(site == SITE and "FRAPPE_PGPOOL_DISABLE_PATCH=1" in why for _, site, why in lines)
