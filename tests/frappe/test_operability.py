"""Operability on the real bench: `bench pgpool status` / `doctor`, the metrics endpoint, and
application_name, with gunicorn workers serving through a real pgBouncer."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest

from .bench import SITE, bench_cli, requires_bench, run_in_bench
from .e2e import Gunicorn, read_site_config, sites_behind_pgbouncer, wait_for
from .test_e2e import TOKEN_SCRIPT

pytestmark = [pytest.mark.frappe, requires_bench]


def bench(*args: str) -> subprocess.CompletedProcess:
	return bench_cli(*args, timeout=300)


def get(web: Gunicorn, path: str, token: str | None) -> tuple[int, str, str]:
	headers = {"X-Frappe-Site-Name": SITE}
	if token:
		headers["Authorization"] = f"token {token}"
	req = urllib.request.Request(f"http://127.0.0.1:{web.port}{path}", headers=headers)
	try:
		with urllib.request.urlopen(req, timeout=60) as resp:
			return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
	except urllib.error.HTTPError as e:
		return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def published_pids() -> set[int]:
	"""The processes whose reports `bench pgpool status` reads (each worker's reaper publishes every 5 s)."""
	result = bench("pgpool", "status", "--json")
	assert result.returncode == 0, result.stderr[-2000:]
	return {r["pid"] for r in json.loads(result.stdout)}


@pytest.fixture(scope="module")
def served():
	token = run_in_bench(TOKEN_SCRIPT, site=SITE)[0]
	with sites_behind_pgbouncer([SITE]) as (bouncer, upstream), Gunicorn(workers=2) as web:
		web.hammer([("/api/method/ping", SITE, None)] * 200, concurrency=4)
		web.each_worker(SITE, token)  # every worker has served (the kernel picks who accepts)
		wait_for(lambda: web.worker_pids() <= published_pids(), "every worker's report published")
		yield {"bouncer": bouncer, "upstream": upstream, "web": web, "token": token}


def test_status_lists_every_worker_process(served):
	web = served["web"]
	result = bench("pgpool", "status", "--json")
	assert result.returncode == 0, result.stderr[-2000:]
	reports = json.loads(result.stdout)
	by_pid = {r["pid"]: r for r in reports}
	assert web.worker_pids() <= set(by_pid), (web.worker_pids(), by_pid.keys())
	for pid in web.worker_pids():
		(pool,) = by_pid[pid]["pools"]
		assert by_pid[pid]["role"] == "web" and pool["created"] >= 1 and pool["size"] <= pool["max_size"]
	table = bench("pgpool", "status").stdout
	print("\n" + table)
	assert f"site {SITE}: " in table and "total:" in table
	from frappe_pgpool import __version__

	assert f"frappe_pgpool {__version__}" in table  # the version every reporting process runs
	assert {by_pid[pid]["version"] for pid in web.worker_pids()} == {__version__}
	text = bench("pgpool", "status", "--prometheus").stdout
	assert "# TYPE frappe_pgpool_checkouts_total counter" in text and f'site="{SITE}"' in text
	password = read_site_config(SITE)["db_password"]
	assert password not in result.stdout + table + text


def test_metrics_endpoint_is_for_system_managers_only(served):
	web, token = served["web"], served["token"]
	code, content_type, text = get(web, "/api/method/frappe_pgpool.api.metrics", token)
	assert code == 200 and content_type.startswith("text/plain; version=0.0.4")
	assert "frappe_pgpool_connections_created_total" in text
	code, _, _ = get(web, "/api/method/frappe_pgpool.api.metrics", None)  # Guest
	assert code == 403
	code, _, _ = get(web, "/api/method/frappe_pgpool.api.status", None)
	assert code == 403


def test_application_name_names_site_and_process(served):
	web, upstream, bouncer = served["web"], served["upstream"], served["bouncer"]
	db = read_site_config(SITE)["db_name"]
	web.each_worker(SITE, served["token"])  # each worker holds its kept connection now (not idled out)
	names = {
		row[0]
		for row in upstream.query(
			"SELECT application_name FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'",
			(db,),
		)
	}
	expected = {f"frappe:{SITE}:{pid}" for pid in web.worker_pids()}
	print(f"\npg_stat_activity application_name for {db}: {sorted(names)}")
	assert expected <= names
	clients = {c["application_name"] for c in bouncer.clients() if c["database"] == db}
	assert expected <= clients


def test_doctor_checks_the_deployment(served, monkeypatch):
	bouncer = served["bouncer"]
	dsn = bouncer.dsn(bouncer.admin_user, bouncer.admin_password, "pgbouncer")
	monkeypatch.setenv("PGPOOL_ADMIN_DSN", dsn)  # the password stays out of argv
	result = bench("pgpool", "doctor")
	print("\n" + result.stdout)
	assert result.returncode == 0, result.stdout + result.stderr[-2000:]
	assert "live now: 2 web" in result.stdout and "from PGPOOL_ADMIN_DSN" in result.stdout
	assert "ok    pool size" in result.stdout and "ok    max_connections" in result.stdout
	assert "0 errors" in result.stdout and "password in argv" not in result.stdout
	assert bouncer.admin_password not in result.stdout
	result = bench("pgpool", "doctor", "--web-workers", "40", "--threads", "4")
	assert result.returncode == 1 and "ERROR pool size" in result.stdout, result.stdout
	monkeypatch.delenv("PGPOOL_ADMIN_DSN")
	result = bench("pgpool", "doctor", "--admin-dsn", dsn)
	assert "WARN  password in argv" in result.stdout and bouncer.admin_password not in result.stdout
