"""Operability without Frappe: reports, the table, Prometheus text, and the doctor's findings
against real pgBouncers configured wrong on purpose."""

from __future__ import annotations

import re

import psycopg2
import pytest

from frappe_pgpool import doctor, observe, publish
from frappe_pgpool.pool import PoolConfig
from frappe_pgpool.testing.cluster import PgBouncer

from .conftest import USERS, frappe_like_factory, key_for

PROM_LINE = re.compile(r'^[a-z_]+\{([a-z_]+="[^"]*",?)+\} -?[0-9.e+-]+$')


def test_reports_table_and_prometheus_from_a_real_pool(bouncer, registry):
	key = key_for(bouncer=bouncer, site="observed.local")
	config = PoolConfig(size=3)
	held = registry.getconn(key, config, frappe_like_factory(bouncer))
	registry.putconn(registry.getconn(key, config, frappe_like_factory(bouncer)))
	(report,) = observe.reports(registry, "observed.local")
	(pool,) = report["pools"]
	assert (pool["size"], pool["in_use"], pool["idle"], pool["checkouts"], pool["created"]) == (2, 1, 1, 2, 2)

	table = observe.render_table([report])
	assert "observed.local" not in table.splitlines()[0] and f"{report['pid']}" in table
	assert "total: 2/3 connections, 1 in use, 1 idle" in table

	text = observe.render_prometheus([report])
	samples = [line for line in text.splitlines() if not line.startswith("#")]
	assert all(PROM_LINE.match(line) for line in samples), samples
	assert (
		f'frappe_pgpool_connections{{site="observed.local",host="{report["host"]}",pid="{report["pid"]}",role="{report["role"]}",state="in_use"}} 1'
		in text
	)
	assert (
		"frappe_pgpool_connections_created_total" in text
		and "# TYPE frappe_pgpool_checkouts_total counter" in text
	)
	for secret in USERS.values():
		assert secret not in table and secret not in text
	registry.putconn(held)


@pytest.mark.parametrize(
	("argv", "role"),
	[
		(["/bench/env/bin/gunicorn", "-w", "2", "frappe.app:application"], "web"),
		(["frappe.utils.bench_helper", "frappe", "worker", "--queue", "short"], "worker"),
		(["frappe.utils.bench_helper", "frappe", "schedule"], "scheduler"),
		(["frappe.utils.bench_helper", "frappe", "--site", "s", "execute", "x"], "other"),
	],
)
def test_process_role(argv, role):
	assert observe.process_role(argv) == role


def deployment(config: PoolConfig, web: int = 4, threads: int = 1, jobs: int = 3) -> doctor.Deployment:
	return doctor.Deployment(
		"site1.local", "app1", "app1", config, web_processes=web, web_threads=threads, job_processes=jobs
	)


def findings(bouncer: PgBouncer, deployments: list[doctor.Deployment]) -> dict[str, doctor.Finding]:
	def connect():
		return psycopg2.connect(bouncer.dsn(bouncer.admin_user, bouncer.admin_password, "pgbouncer"))

	connect().close()
	bouncer.connect("app1", USERS["app1"]).close()  # SHOW DATABASES lists a database once used
	found = doctor.examine(connect, deployments)
	print("\n" + doctor.render(found))
	return {f.check: f for f in found}


def test_doctor_passes_a_deployment_sized_right(cluster):
	settings = dict(default_pool_size=20, max_client_conn=100, client_idle_timeout=0, server_lifetime=3600)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		found = findings(bouncer, [deployment(PoolConfig(enabled=True, size=4), web=4, threads=4, jobs=3)])
	assert {f.level for f in found.values()} == {"ok"}, found
	assert "4 web x 4 + 3 job processes = 19 clients" in found["pool size"].message


def test_doctor_finds_each_misconfiguration(cluster):
	settings = dict(
		pool_mode="transaction",
		default_pool_size=5,
		max_client_conn=10,
		client_idle_timeout=30,
		server_lifetime=300,
		server_login_retry=15,
	)
	config = PoolConfig(enabled=True, size=8, max_idle=60, max_lifetime=600)
	with PgBouncer(cluster, users=USERS, **settings) as bouncer:
		found = findings(bouncer, [deployment(config, web=4, threads=4, jobs=3)])
	assert found["pool_mode"].level == "warn" and "transaction" in found["pool_mode"].message
	assert found["max_client_conn"].level == "error" and "19" in found["max_client_conn"].fix
	assert (
		found["client_idle_timeout"].level == "warn"
		and "db_pool_max_idle to 24" in found["client_idle_timeout"].fix
	)
	assert found["server_login_retry"].level == "warn"
	assert "pool size" not in found  # transaction mode releases servers between transactions


def test_doctor_finds_a_pool_too_small_for_session_mode(cluster):
	config = PoolConfig(enabled=True, size=8, max_lifetime=7200)
	with PgBouncer(cluster, users=USERS, default_pool_size=6, server_lifetime=3600) as bouncer:
		found = findings(bouncer, [deployment(config, web=3, threads=2, jobs=2)])
	assert found["pool size"].level == "error"
	assert "at least 8" in found["pool size"].fix and "query_wait_timeout" in found["pool size"].message
	assert found["server_lifetime"].level == "warn" and "3600" in found["server_lifetime"].fix


def test_doctor_warns_when_pooled_clients_never_leave(cluster):
	with PgBouncer(cluster, users=USERS) as bouncer:
		found = findings(bouncer, [deployment(PoolConfig(enabled=True, max_lifetime=0), web=1, jobs=1)])
	assert found["max_lifetime"].level == "warn" and "never finish" in found["max_lifetime"].message


def test_doctor_reports_an_unreachable_admin_console_without_secrets(cluster):
	with PgBouncer(cluster, users=USERS) as bouncer:

		def connect():
			return psycopg2.connect(bouncer.dsn("app1", USERS["app1"], "pgbouncer"))  # not an admin user

		found = doctor.examine(connect, [deployment(PoolConfig(enabled=True))])
	(finding,) = found
	assert finding.level == "error" and "admin_users or stats_users" in finding.fix
	assert USERS["app1"] not in doctor.render(found)


# --- secrets: DSNs and libpq errors are shown redacted, and the admin DSN need not be in argv ---


def admin_dsn(bouncer: PgBouncer, password: str | None = None) -> str:
	dsn = f"host={bouncer.host} port={bouncer.port} dbname=pgbouncer user={bouncer.admin_user}"
	return dsn if password is None else f"{dsn} password={password}"


@pytest.mark.parametrize(
	("template", "fragment"),
	[
		(
			"host={host} port={port} dbname=pgbouncer user=pgbadmin password=first-half second-half",
			"second-half",
		),
		("host={host} port={port} dbname=pgbouncer user=pgbadmin password=pw sneakytail=1", "sneakytail"),
		("postgresql://pgbadmin:s3cr%zzet@{host}:{port}/pgbouncer", "s3cr"),
		("postgresql://pgbadmin:hunter2@[::1:{port}/pgbouncer", "hunter2"),
		("postgresql://pgbadmin@{host}:{port}/pgbouncer?password=hunter3&bogus=1", "hunter3"),
		("host={host} port={port} dbname=pgbouncer user=pgbadmin password='no end quote", "no end"),
	],
)
def test_doctor_never_echoes_a_bad_dsn(bouncer, template, fragment):
	dsn = template.format(host=bouncer.host, port=bouncer.port)
	found = doctor.examine(lambda: psycopg2.connect(dsn), [deployment(PoolConfig(enabled=True))])
	text = doctor.render(found)
	print("\n" + text)
	assert found[0].level == "error" and "admin console" in found[0].check
	assert fragment not in text and "invalid" in text


@pytest.mark.parametrize(
	("text", "secret", "kept"),
	[
		("redis://:redispw@10.0.0.5:6379/0", "redispw", "10.0.0.5:6379/0"),
		("postgresql://stats:pw-uri@10.0.0.5:6432/pgbouncer", "pw-uri", "10.0.0.5:6432/pgbouncer"),
		("postgres://stats@10.0.0.5/pgbouncer?sslmode=require&password=pw-q&x=1", "pw-q", "sslmode=require"),
		("postgresql:///pgbouncer?host=/run/pg&password=pw-q2", "pw-q2", "host=/run/pg"),
		("host=10.0.0.5 port=6432 dbname=pgbouncer user=stats password=pw-kw", "pw-kw", "user=stats"),
		(
			"host=10.0.0.5 password = 'pw with spaces \\' and quote' dbname=pgbouncer",
			"spaces",
			"dbname=pgbouncer",
		),
		("cannot connect (host=h password=pw-in-error): refused", "pw-in-error", "refused"),
	],
)
def test_redacted_hides_passwords_of_uri_and_keyword_dsns(text, secret, kept):
	shown = publish.redacted(text)
	assert secret not in shown and kept in shown and "***" in shown, shown


def test_admin_dsn_from_environment_config_passfile_or_prompt(bouncer, tmp_path, monkeypatch):
	deployments = [deployment(PoolConfig(enabled=True))]
	with_password = admin_dsn(bouncer, bouncer.admin_password)
	sources = [
		({"PGPOOL_ADMIN_DSN": with_password}, {}, None, "PGPOOL_ADMIN_DSN"),
		({}, {"pgbouncer_admin_dsn": with_password}, None, "pgbouncer_admin_dsn"),
		(
			{},
			{"pgbouncer_admin_dsn": admin_dsn(bouncer)},
			lambda: bouncer.admin_password,
			"pgbouncer_admin_dsn + prompt",
		),
	]
	for environ, conf, ask, source in sources:
		resolved = doctor.resolve_admin_dsn(None, conf, environ, ask=ask)
		assert resolved.source == source and not resolved.findings, resolved
		found = doctor.examine(resolved.connect, deployments)
		assert not [f for f in found if f.check == "admin console"], doctor.render(found)
		assert bouncer.admin_password not in resolved.shown + repr(resolved.findings)

	# libpq's own: the DSN without a password, the password in a passfile
	passfile = tmp_path / "pgpass"
	passfile.write_text(
		f"{bouncer.host}:{bouncer.port}:pgbouncer:{bouncer.admin_user}:{bouncer.admin_password}\n"
	)
	passfile.chmod(0o600)
	monkeypatch.setenv("PGPASSFILE", str(passfile))
	resolved = doctor.resolve_admin_dsn(None, {"pgbouncer_admin_dsn": admin_dsn(bouncer)}, {})
	found = doctor.examine(resolved.connect, deployments)
	assert not [f for f in found if f.check == "admin console"], doctor.render(found)

	# in argv: works, with a warning that names the ways to keep it out
	resolved = doctor.resolve_admin_dsn(with_password, {}, {})
	(warning,) = resolved.findings
	assert warning.level == "warn" and "ps" in warning.message and "PGPOOL_ADMIN_DSN" in warning.fix
	assert bouncer.admin_password not in doctor.render(resolved.findings) + resolved.shown
	assert not doctor.resolve_admin_dsn(admin_dsn(bouncer), {}, {}).findings  # no password, no warning
