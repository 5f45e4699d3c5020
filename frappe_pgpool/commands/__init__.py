"""bench commands: `bench --site S pgpool status` and `bench --site S pgpool doctor`."""

from __future__ import annotations

import json
import os
import sys

import click
from frappe.commands import get_site, pass_context


@click.group("pgpool")
def pgpool() -> None:
	"""frappe_pgpool: see the connection pools, check the pgBouncer deployment."""


@pgpool.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@click.option("--prometheus", is_flag=True, help="Print Prometheus text exposition.")
@pass_context
def status(context, as_json: bool, prometheus: bool) -> None:
	"""Pool figures of every running web and worker process of the site (published to Redis)."""
	import frappe

	from frappe_pgpool import observe, publish

	site = get_site(context)
	frappe.init(site=site)
	try:
		url = frappe.conf.redis_cache
		try:
			items = publish.collect(url, site)
		except Exception as e:
			click.secho(
				f"cannot read pool reports from Redis ({publish.redacted(url)}): {publish.redacted(e)}",
				fg="red",
			)
			sys.exit(1)
	finally:
		frappe.destroy()
	if as_json:
		click.echo(json.dumps(items, indent=1, sort_keys=True))
	elif prometheus:
		click.echo(observe.render_prometheus(items), nl=False)
	elif not items:
		click.echo(
			f"No process has reported pools for {site} in the last {publish.TTL}s. Are web or worker "
			"processes running and serving this site, with db_pool_enabled set?"
		)
	else:
		click.echo(f"site {site}: {len(items)} processes\n" + observe.render_table(items))


@pgpool.command("doctor")
@click.option(
	"--admin-dsn",
	help="libpq DSN of pgBouncer's admin console (default: $PGPOOL_ADMIN_DSN, then pgbouncer_admin_dsn in "
	"config). Keep the password out of it (ps shows argv): use those, ~/.pgpass / PGPASSFILE, or --ask-password.",
)
@click.option("--ask-password", is_flag=True, help="Prompt for the admin console's password (not echoed).")
@click.option("--web-workers", type=int, help="Gunicorn workers (default: gunicorn_workers or live count).")
@click.option("--threads", type=int, help="Threads per gunicorn worker (default: gunicorn_threads or 1).")
@click.option(
	"--job-processes",
	type=int,
	help="RQ workers + scheduler (default: live count or 2 x background_workers + 1).",
)
@pass_context
def doctor(context, admin_dsn, ask_password, web_workers, threads, job_processes) -> None:
	"""Check the pgBouncer deployment of the site against the pool settings of the bench's sites."""
	import frappe

	from frappe_pgpool import doctor as checks
	from frappe_pgpool import publish
	from frappe_pgpool.pool import ConfigError, parse_config

	site = get_site(context)
	frappe.init(site=site)
	try:
		conf = frappe.conf
		ask = (lambda: click.prompt("pgBouncer admin password", hide_input=True)) if ask_password else None
		admin = checks.resolve_admin_dsn(admin_dsn, conf, os.environ, ask=ask)
		live = _live_counts(publish, conf.redis_cache)
		threads = threads or int(conf.get("gunicorn_threads") or 1)
		deployments, findings = [], list(admin.findings)
		for name, site_conf in _sites_behind_same_bouncer(frappe, site):
			try:
				config = parse_config({k: v for k, v in site_conf.items() if k.startswith("db_pool_")})
			except ConfigError as e:
				findings.append(
					checks.Finding(
						"error", "site config", f"{name}: {e}", "fix the value in site_config.json"
					)
				)
				continue
			if not config.enabled:
				continue
			web, jobs = live.get(name, (0, 0))
			deployments.append(
				checks.Deployment(
					site=name,
					dbname=site_conf.get("db_name"),
					user=site_conf.get("db_user") or site_conf.get("db_name"),
					config=config,
					web_processes=web_workers
					or web
					or int(conf.get("gunicorn_workers") or (os.cpu_count() or 1) * 2 + 1),
					web_threads=threads,
					job_processes=job_processes or jobs or 2 * int(conf.get("background_workers") or 1) + 1,
				)
			)
	finally:
		frappe.destroy()
	click.echo(
		"assuming: "
		+ "; ".join(
			f"{d.site}: {d.web_processes} web x {d.web_threads} threads, {d.job_processes} job processes, "
			f"db_pool_size={d.config.size}"
			for d in deployments
		)
	)
	if admin.dsn:
		click.echo(f"pgBouncer admin console: {admin.shown} (from {admin.source})")
		findings += checks.examine(admin.connect, deployments)
	else:
		findings.append(
			checks.Finding(
				"warn",
				"admin console",
				"pgBouncer not checked: no admin console configured",
				'set pgbouncer_admin_dsn, e.g. "host=10.0.0.5 port=6432 dbname=pgbouncer user=stats" '
				"(a user in pgBouncer's stats_users), in common_site_config.json or $PGPOOL_ADMIN_DSN; "
				"its password there, in ~/.pgpass, or with --ask-password",
			)
		)
	click.echo(checks.render(findings))
	sys.exit(1 if any(f.level == "error" for f in findings) else 0)


def _live_counts(publish, url: str | None) -> dict[str, tuple[int, int]]:
	"""site -> (web processes, job processes) that reported in the last TTL seconds."""
	counts: dict[str, list[int]] = {}
	try:
		items = publish.collect(url) if url else []
	except Exception:
		return {}
	for report in items:
		web_jobs = counts.setdefault(report["site"], [0, 0])
		web_jobs[0 if report["role"] == "web" else 1] += 1
	return {site: (web, jobs) for site, (web, jobs) in counts.items()}


def _sites_behind_same_bouncer(frappe, site: str) -> list[tuple[str, dict]]:
	"""(name, config) of the bench's sites whose database server is this site's (the same pgBouncer)."""
	from frappe.utils import get_sites

	def address(conf) -> tuple:
		return (conf.get("db_host") or "localhost", str(conf.get("db_port") or ""))

	def config(name: str) -> dict:
		return frappe.get_site_config(site_path=os.path.join(frappe.local.sites_path, name))

	mine = address(frappe.conf)
	found = []
	for name in get_sites():
		conf = config(name)
		if conf.get("db_type") == "postgres" and address(conf) == mine:
			found.append((name, conf))
	return found or [(site, config(site))]


commands = [pgpool]
