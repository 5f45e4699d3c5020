"""bench commands: `bench --site S pgpool status`, `bench --site S pgpool doctor`, `bench pgpool worker`."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click
from frappe.commands import get_site, pass_context

from .. import bootstrap

# Every bench command imports this module (bench collects the apps' commands) before Frappe's PostgreSQL
# module: arm here, so that a bench process arms at start even where the .pth did not run (an interpreter
# started without site-packages' .pth files, an app on PYTHONPATH). Importing the package itself arms
# nothing (frappe_pgpool/__init__.py); arming twice is a no-op.
bootstrap.arm()


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
		click.echo(json.dumps(observe.with_rates(items), indent=1, sort_keys=True))
	elif prometheus:
		click.echo(observe.render_prometheus(items), nl=False)
	elif not items:
		click.echo(
			f"No process has reported pools for {site} in the last {publish.TTL}s. Are web or worker "
			"processes running and serving this site, with db_pool_enabled set?"
		)
	else:
		# a process of a version before 0.2.0 reports none: a bench mid-upgrade shows both
		versions = ", ".join(sorted({str(item.get("version", "before 0.2.0")) for item in items}))
		click.echo(
			f"site {site}: {len(items)} processes, frappe_pgpool {versions}\n" + observe.render_table(items)
		)


@pgpool.command("doctor")
@click.option(
	"--admin-dsn",
	help="libpq DSN of pgBouncer's admin console (default: $PGPOOL_ADMIN_DSN, then pgbouncer_admin_dsn in "
	"config). Keep the password out of it (ps shows argv): use those, ~/.pgpass / PGPASSFILE, or --ask-password.",
)
@click.option("--ask-password", is_flag=True, help="Prompt for the admin console's password (not echoed).")
@click.option(
	"--postgres-dsn",
	help="libpq DSN to PostgreSQL, for sites whose own credentials cannot read their server (default: "
	"$PGPOOL_POSTGRES_DSN, then pgpool_postgres_dsn in config); its password in ~/.pgpass / PGPASSFILE.",
)
@click.option("--web-workers", type=int, help="Gunicorn workers (default: live count or gunicorn_workers).")
@click.option("--threads", type=int, help="Threads per gunicorn worker (default: gunicorn_threads or 1).")
@click.option(
	"--job-processes",
	type=int,
	help="RQ work-horses + scheduler (default: live count or 2 x background_workers + 1).",
)
@click.option(
	"--apply",
	"apply_clients",
	is_flag=True,
	help="Then set db_pool_process_clients in common_site_config.json (the client budget of sites in "
	"pgBouncer transaction mode) to the largest value whose worst case every check accepts, or remove it "
	"where none is.",
)
@pass_context
def doctor(
	context, admin_dsn, ask_password, postgres_dsn, web_workers, threads, job_processes, apply_clients
) -> None:
	"""Check pgBouncer and PostgreSQL against what the pools of all the bench's sites can hold at once."""
	import frappe

	from frappe_pgpool import doctor as checks
	from frappe_pgpool import publish

	site = get_site(context)
	frappe.init(site=site)
	try:
		conf = frappe.conf
		ask = (lambda: click.prompt("pgBouncer admin password", hide_input=True)) if ask_password else None
		admin = checks.resolve_admin_dsn(admin_dsn, conf, os.environ, ask=ask)
		postgres = checks.resolve_postgres_dsn(postgres_dsn, conf, os.environ)
		try:
			reports = publish.collect(conf.redis_cache) if conf.redis_cache else []
		except Exception:
			reports = []
		sites, findings = _bench_sites(frappe, checks)
		live_web, live_jobs = _live_counts(reports)
		seen = (  # the bench as it runs (live processes) or is configured
			max(live_web, int(conf.get("gunicorn_workers") or 0)) or (os.cpu_count() or 1) * 2 + 1,
			int(conf.get("gunicorn_threads") or 1),
			max(live_jobs, _job_processes(conf)),
		)
		asked = (web_workers, threads, job_processes)
		# asked about a larger bench, doctor counts it; a value written for the bench must fit the real one too
		web, per_worker, jobs = (
			max(a or 0, s) if apply_clients else (a or s) for a, s in zip(asked, seen, strict=True)
		)
		bench = checks.Bench(sites, web=web, threads=per_worker, jobs=jobs)
		mine = checks.address(conf.get("db_host") or conf.get("db_socket"), conf.get("db_port"))
		sites_path = frappe.local.sites_path
	finally:
		frappe.destroy()
	pooled = [s for s in sites if s.pooled]
	budget = checks.process_budget(sites, bench.threads)
	click.echo(
		f"bench: {len(sites)} PostgreSQL sites, {len(pooled)} pooled; assuming {bench.web} web processes x "
		f"{bench.threads} threads and {bench.jobs} job processes (live now: {live_web} web, {live_jobs} other); "
		+ (
			f"a web process keeps at most {budget} connections across all sites (db_pool_process_budget="
			f"{'/'.join(sorted({str(s.process_budget) for s in pooled}))})"
			if budget
			else "no per-process budget"
		)
	)
	bouncers = {}
	if admin.dsn:
		at = checks.dsn_address(admin.dsn)
		if at not in {s.address for s in sites} and at.rpartition(":")[2] == mine.rpartition(":")[2]:
			at = mine  # the same port under another name (a socket, a host name): this site's pgBouncer
		click.echo(f"pgBouncer admin console: {admin.shown} (from {admin.source}), for the sites at {at}")
		bouncers[at] = admin.connect
	findings = [*admin.findings, *postgres.findings, *findings]
	read_postgres = postgres.connect if postgres.dsn else None
	findings += checks.examine(bench, bouncers, read_postgres)
	findings += checks.check_processes(reports)
	click.echo(checks.render(findings))
	if apply_clients:
		from frappe_pgpool.pool.config import PROCESS_CLIENTS_KEY

		own = [s.name for s in sites if PROCESS_CLIENTS_KEY in _json_file(_site_config(sites_path, s.name))]
		advice = checks.advise_process_clients(bench, bouncers, read_postgres, overriding=own, known=findings)
		_apply_process_clients(sites_path, advice)
		if advice.applies and not advice.decided:  # a decision asked for and not made: fails the command
			sys.exit(1)
	sys.exit(1 if any(f.level == "error" for f in findings) else 0)


def _apply_process_clients(sites_path: str, advice) -> None:
	"""Write doctor's advice on db_pool_process_clients into common_site_config.json: the value where every
	check accepts one, no key where none fits, unchanged where doctor cannot tell. Frappe reads the config
	at every request: no restart needed."""
	from frappe_pgpool.pool.config import PROCESS_CLIENTS_KEY as key

	path = os.path.abspath(os.path.join(sites_path, "common_site_config.json"))
	current = _json_file(path).get(key)
	was = "unset" if current is None else json.dumps(current)
	if not advice.applies:
		click.echo(f"apply: nothing to do: {advice.reason}")
		return
	if advice.value is not None:
		click.echo(f"apply: {advice.reason}")
		for finding in advice.accepted:
			click.echo(f"  {finding.level:5} {finding.check}: {finding.message}")
	elif advice.decided:
		click.echo(f"apply: {key} does not fit: {advice.reason}\n  fix: {advice.fix}")
	else:
		click.echo(
			f"apply: cannot tell, {path} left as it is ({key}: {was}): {advice.reason}"
			+ (f"\n  fix: {advice.fix}" if advice.fix else "")
		)
		return
	if advice.value is None and (current is None or str(current).strip().lower() == "auto"):
		click.echo(f"apply: {path} unchanged ({key}: {was}, off)")
		return
	if current == advice.value:
		click.echo(f"apply: {path} unchanged ({key}: {was})")
		return
	_write_config(path, key, advice.value)
	now = f"set to {advice.value}" if advice.value is not None else "removed (off)"
	click.echo(f"apply: {key} {now} in {path} (was {was})")


def _write_config(path: str, key: str, value: object) -> None:
	"""Set (None: remove) one key of a JSON config file, under Frappe's lock for it, by an atomic rename
	(a request reading it meanwhile sees the old or the new file, never half of one) of a copy with the
	file's owner and mode (it may hold passwords), flushed to disk first. A file that does not read as a
	JSON object is left alone: raises."""
	from frappe.utils.synchronization import filelock

	with filelock("site_config", is_global=True):
		with open(path) as f:
			data = json.load(f)
		if not isinstance(data, dict):
			raise ValueError(f"{path} does not hold a JSON object")
		if value is None:
			data.pop(key, None)
		else:
			data[key] = value
		mode = os.stat(path)
		tmp = f"{path}.{os.getpid()}.tmp"
		fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode.st_mode & 0o777)
		try:
			with os.fdopen(fd, "w") as f:
				f.write(json.dumps(data, indent=1, sort_keys=True))
				f.flush()
				os.fsync(f.fileno())
			os.chmod(tmp, mode.st_mode & 0o777)
			if hasattr(os, "chown"):
				os.chown(tmp, mode.st_uid, mode.st_gid)
			os.replace(tmp, path)
		except BaseException:
			with contextlib.suppress(OSError):
				os.unlink(tmp)
			raise
		directory = os.open(os.path.dirname(path), os.O_RDONLY)
		try:
			os.fsync(directory)
		finally:
			os.close(directory)


def _site_config(sites_path: str, name: str) -> str:
	return os.path.join(sites_path, name, "site_config.json")


def _json_file(path: str) -> dict:
	try:
		with open(path) as f:
			value = json.load(f)
	except (OSError, ValueError):
		return {}
	return value if isinstance(value, dict) else {}


def _job_processes(conf) -> int:
	"""Job processes bench's supervisor and Procfile start: background_workers each for the short and the
	long queues, one for each queue of `workers` (its own background_workers, else the bench's), and the
	scheduler."""
	each = int(conf.get("background_workers") or 1)
	custom = conf.get("workers") or {}
	extra = (
		sum(int((w or {}).get("background_workers") or each) for w in custom.values())
		if isinstance(custom, dict)
		else 0
	)
	return 2 * each + extra + 1


def _live_counts(reports: list[dict]) -> tuple[int, int]:
	"""(web, other) processes of the bench that reported in the last TTL seconds, each counted once."""
	roles = {(r.get("host"), r.get("pid")): r.get("role") for r in reports}
	web = sum(role == "web" for role in roles.values())
	return web, len(roles) - web


def _bench_sites(frappe, checks) -> tuple[list, list]:
	"""Every PostgreSQL site of the bench, with its pool settings and a way to connect as it does."""
	from frappe.utils import get_sites

	from frappe_pgpool.pool import ConfigError, parse_config
	from frappe_pgpool.pool import config as pool_config

	# db_pool_process_budget: "auto" by default where this version has it; without it, no budget
	default_budget = "auto" if hasattr(pool_config, "PROCESS_BUDGET_KEY") else None
	# db_pool_process_clients (transaction-mode pools' client budget): likewise
	default_clients = "auto" if hasattr(pool_config, "PROCESS_CLIENTS_KEY") else None
	sites, findings = [], []
	for name in get_sites():
		conf = frappe.get_site_config(site_path=os.path.join(frappe.local.sites_path, name))
		if conf.get("db_type") != "postgres":
			continue
		try:
			config = parse_config({k: v for k, v in conf.items() if k.startswith("db_pool_")})
		except ConfigError as e:
			findings.append(
				checks.Finding("error", "site config", f"{name}: {e}", "fix the value in site_config.json")
			)
			continue
		dbname = conf.get("db_name")
		user = conf.get("db_user") or dbname
		host = conf.get("db_host") or conf.get("db_socket")
		sites.append(
			checks.Site(
				name,
				dbname,
				user,
				config,
				checks.address(host, conf.get("db_port")),
				_connector(host, conf.get("db_port"), dbname, user, conf.get("db_password")),
				conf.get("db_pool_process_budget", default_budget),
				conf.get("db_pool_process_clients", default_clients),
			)
		)
	return sites, findings


def _connector(host, port, dbname, user, password):
	"""Connect as the site's processes do (the password is passed to libpq, never shown)."""

	def connect():
		import psycopg2

		kw = {"host": host, "port": port, "password": password}
		kw = {k: v for k, v in kw.items() if v}
		return psycopg2.connect(
			dbname=dbname, user=user, connect_timeout=5, application_name="frappe_pgpool doctor", **kw
		)

	return connect


@pgpool.command("worker")
@click.option("--queue", type=str, help="Queues to work on, comma separated (default: all, as bench worker).")
@click.option("--quiet", is_flag=True, default=False, help="Log warnings and errors only.")
@click.option("--burst", is_flag=True, default=False, help="Run the queued jobs, then exit.")
@click.option(
	"--max-jobs",
	type=int,
	default=1000,
	show_default=True,
	help="Recycle the process after this many jobs (+-10%% jitter); 0: never.",
)
@click.option(
	"--max-memory",
	type=int,
	default=1024,
	show_default=True,
	help="Recycle the process after a job that leaves its RSS above this many MB; 0: never.",
)
@click.option(
	"--respawn",
	is_flag=True,
	default=False,
	help="On recycling, replace the process by a fresh one (exec, same pid) instead of exiting 0 for the "
	"supervisor to restart it (for bench start's Procfile, or a Kubernetes container).",
)
@click.option(
	"--no-scheduler",
	is_flag=True,
	default=False,
	help="Do not run Frappe's scheduler in a thread of the worker (one per bench runs it anyway).",
)
@click.option(
	"--process-budget",
	type=click.IntRange(1, 1000),
	help="Connections this process keeps across all sites (db_pool_process_budget for this worker only, "
	"in place of the config's; default: the config's, auto = one, as a forking worker has open). Set it to the number of sites the "
	"worker serves to log in once per site; each kept connection holds a pgBouncer server (session mode).",
)
@click.option(
	"--hard-stop-after",
	type=click.FloatRange(1, 3600),
	default=60.0,
	show_default=True,
	help="Seconds past a job's timeout before a job that has not stopped (its timeout's exception "
	"swallowed, or stuck in C code) is recorded as failed and the process exits (or, with --respawn, "
	"replaces itself); the forking worker's parent kills such a horse at 60 s.",
)
def worker(
	queue, quiet, burst, max_jobs, max_memory, respawn, no_scheduler, process_budget, hard_stop_after
) -> None:
	"""Run background jobs in this process (no fork per job): the pool keeps each site's connection."""
	from frappe_pgpool.worker import start_worker

	start_worker(
		queue=queue,
		quiet=quiet,
		burst=burst,
		max_jobs=max_jobs or None,
		max_memory_mb=max_memory or None,
		scheduler=not no_scheduler,
		respawn=respawn,
		process_budget=process_budget,
		hard_stop_after=hard_stop_after,
	)


commands = [pgpool]
