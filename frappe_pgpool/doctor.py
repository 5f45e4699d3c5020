"""Deployment checks against pgBouncer's admin console. No Frappe import.

Each finding says what is wrong and how to fix it. The sizing rule comes from session mode: a
pooled client keeps its server connection for as long as it stays connected, so the clients
that one site's processes may hold must fit in that database's pgBouncer pool, or the excess
waits in pgBouncer (cl_waiting) and fails after query_wait_timeout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions

from .pool import PoolConfig
from .publish import redacted


@dataclass(frozen=True)
class Deployment:
	"""One pooled site and the processes that connect for it."""

	site: str
	dbname: str
	user: str
	config: PoolConfig
	web_processes: int
	web_threads: int = 1
	job_processes: int = 1  # RQ workers and the scheduler: one connection each at a time

	@property
	def clients(self) -> int:
		"""Most pgBouncer clients (so, in session mode, server connections) this site can hold."""
		per_web = min(self.web_threads, self.config.size)
		return self.web_processes * per_web + self.job_processes * min(1, self.config.size)


@dataclass(frozen=True)
class Finding:
	level: str  # "ok", "warn" or "error"
	check: str
	message: str
	fix: str = ""


def admin_rows(connect: Callable[[], object], command: str) -> list[dict]:
	"""One admin-console command on a fresh connection; rows as dicts ([] for PAUSE, KILL, ...)."""
	conn = connect()
	try:
		conn.autocommit = True
		with conn.cursor() as cur:
			cur.execute(command)
			if cur.description is None:
				return []
			names = [d.name for d in cur.description]
			return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
	finally:
		conn.close()


# libpq quotes what it could not parse ('missing "=" after "..."', 'invalid connection option "..."',
# 'invalid percent-encoded token: "..."', a whole URI): fragments of a malformed DSN, password included.
_QUOTED = re.compile(r'"[^"]*"')


def describe_error(error: BaseException, *secrets: str | None) -> str:
	"""The first line of a (libpq) error, safe to show: no fragment of a DSN it could not parse."""
	text = str(error).strip()
	line = text.splitlines()[0] if text else type(error).__name__
	if re.search(r"invalid|connection info string|URI|unterminated", line, re.IGNORECASE):
		line = _QUOTED.sub(lambda m: m[0] if m[0] == '"="' else '"***"', line)
	return redacted(line, *secrets)


def dsn_password(dsn: str) -> str | None:
	"""The password a DSN carries (keyword or URI form), or None."""
	try:
		return psycopg2.extensions.parse_dsn(dsn).get("password") or None
	except psycopg2.Error:
		return None  # malformed: describe_error hides what libpq quotes of it


def carries_password(dsn: str) -> bool:
	return bool(dsn_password(dsn)) or redacted(dsn) != dsn


@dataclass(frozen=True)
class ResolvedDsn:
	"""A DSN to connect with, where it came from, and what to show of it (password hidden)."""

	dsn: str | None
	source: str
	findings: list[Finding] = field(default_factory=list)

	@property
	def shown(self) -> str:
		return redacted(self.dsn) if self.dsn else "(none)"

	def connect(self, **kw) -> psycopg2.extensions.connection:
		try:
			return psycopg2.connect(self.dsn, **kw)
		except psycopg2.Error as e:  # libpq quotes fragments of a malformed DSN: never pass them on
			raise type(e)(describe_error(e, dsn_password(self.dsn or ""))) from None


ADMIN_DSN_ENV = "PGPOOL_ADMIN_DSN"
ADMIN_DSN_KEYS = ("pgbouncer_admin_dsn", "pgpool_admin_dsn")


def resolve_admin_dsn(
	option_dsn: str | None,
	conf: Mapping[str, object],
	environ: Mapping[str, str],
	ask: Callable[[], str] | None = None,
) -> ResolvedDsn:
	"""pgBouncer's admin console DSN: --admin-dsn, else $PGPOOL_ADMIN_DSN, else the config key.

	A password may come with it, or from libpq itself (PGPASSWORD, PGPASSFILE or ~/.pgpass), or from
	`ask` (a prompt) when the DSN has none. One in argv is visible in ps: that is a warning.
	"""
	return _resolve("--admin-dsn", option_dsn, ADMIN_DSN_ENV, ADMIN_DSN_KEYS, conf, environ, ask)


def _resolve(option, option_dsn, env, keys, conf, environ, ask) -> ResolvedDsn:
	findings = []
	if option_dsn:
		dsn, source = option_dsn, option
		if carries_password(dsn):
			findings.append(
				Finding(
					"warn",
					"password in argv",
					f"the password in {option} is visible to every local user (ps, /proc) while doctor runs, "
					"and stays in your shell history",
					f"leave it out of the command line: export {env}, or set {keys[0]} in "
					"common_site_config.json, or keep it out of the DSN and put it in ~/.pgpass (or PGPASSFILE), "
					"or use --ask-password",
				)
			)
	elif environ.get(env):
		dsn, source = environ[env], env
	else:
		key = next((k for k in keys if conf.get(k)), None)
		dsn, source = (str(conf[key]), key) if key else (None, "")
	if dsn and ask is not None and not carries_password(dsn):
		try:
			dsn = psycopg2.extensions.make_dsn(dsn, password=ask())
		except psycopg2.Error:
			pass  # malformed: connecting says so, redacted
		source += " + prompt"
	return ResolvedDsn(dsn, source, findings)


def _number(value: object) -> float:
	try:
		return float(value)  # SHOW CONFIG gives text
	except (TypeError, ValueError):
		return 0.0


def examine(connect: Callable[[], object], deployments: list[Deployment]) -> list[Finding]:
	"""Check the deployments against the pgBouncer that `connect` reaches (its admin console)."""
	try:
		settings = {row["key"]: row["value"] for row in admin_rows(connect, "SHOW CONFIG")}
		databases = {row["name"]: row for row in admin_rows(connect, "SHOW DATABASES")}
		pools = admin_rows(connect, "SHOW POOLS")
	except psycopg2.Error as e:
		reason = describe_error(e)
		return [
			Finding(
				"error",
				"admin console",
				f"cannot query pgBouncer's admin console: {reason}",
				"give pgbouncer_admin_dsn (common_site_config.json, $PGPOOL_ADMIN_DSN or --admin-dsn) a user "
				"listed in pgBouncer's admin_users or stats_users, with dbname=pgbouncer",
			)
		]
	findings: list[Finding] = []
	default_mode = settings.get("pool_mode", "session")
	default_size = int(_number(settings.get("default_pool_size")))
	reserve = int(_number(settings.get("reserve_pool_size")))
	total_clients = 0
	for d in deployments:
		entry = databases.get(d.dbname) or databases.get("*") or {}
		mode = entry.get("pool_mode") or default_mode
		size = int(_number(entry.get("pool_size"))) or default_size
		total_clients += d.clients
		findings += _pool_mode(d, mode)
		if mode == "session":
			findings += _sizing(d, size, reserve, settings)
		findings += _waiting(d, pools)
		findings += _idle_timeout(d, settings)
		findings += _lifetime(d, settings, mode)
	max_client = int(_number(settings.get("max_client_conn")))
	if max_client and total_clients > max_client:
		findings.append(
			Finding(
				"error",
				"max_client_conn",
				f"the pooled sites can hold {total_clients} clients; pgBouncer accepts max_client_conn={max_client}",
				f"raise max_client_conn to at least {total_clients} plus your other clients, or lower db_pool_size",
			)
		)
	elif max_client:
		findings.append(
			Finding(
				"ok",
				"max_client_conn",
				f"{total_clients} pooled clients at most, max_client_conn={max_client}",
			)
		)
	retry = _number(settings.get("server_login_retry"))
	if retry > 5:
		findings.append(
			Finding(
				"warn",
				"server_login_retry",
				f"after a failed server login (PostgreSQL restarting) pgBouncer refuses logins for {retry:g}s",
				"set server_login_retry = 1 to 3 so that pooled workers heal quickly after a PostgreSQL restart",
			)
		)
	return findings


def _pool_mode(d: Deployment, mode: str) -> list[Finding]:
	if mode == "session":
		return [Finding("ok", "pool_mode", f"{d.site}: session mode")]
	fix = "use pool_mode = session for Frappe databases"
	if d.config.reset_query:
		fix += f', or keep {mode} mode and set db_pool_reset_query to "" (the reset then runs on an arbitrary server)'
	return [
		Finding(
			"warn",
			"pool_mode",
			f"{d.site}: pool_mode is {mode}: Frappe's session state (SET, temp tables, advisory locks, "
			"LISTEN) does not follow a client across transactions there",
			fix,
		)
	]


def _sizing(d: Deployment, size: int, reserve: int, settings: dict) -> list[Finding]:
	demand = (
		f"{d.web_processes} web x {min(d.web_threads, d.config.size)} + {d.job_processes} job processes "
		f"= {d.clients} clients"
	)
	if d.clients > size + reserve:
		wait = settings.get("query_wait_timeout", "120")
		return [
			Finding(
				"error",
				"pool size",
				f"{d.site}: {demand}, but pgBouncer's pool for {d.dbname} has {size} server connections "
				f"(+{reserve} reserve); in session mode the excess waits, then fails after query_wait_timeout={wait}s",
				f"raise default_pool_size (or pool_size for {d.dbname}) to at least {d.clients}, "
				"or lower db_pool_size / the number of workers",
			)
		]
	return [Finding("ok", "pool size", f"{d.site}: {demand} within pool_size {size}")]


def _waiting(d: Deployment, pools: list[dict]) -> list[Finding]:
	waiting = sum(int(p.get("cl_waiting") or 0) for p in pools if p.get("database") == d.dbname)
	if waiting:
		return [
			Finding(
				"warn",
				"cl_waiting",
				f"{d.site}: {waiting} clients are waiting for a server connection right now",
				f"see SHOW POOLS for {d.dbname}; raise its pool_size or lower db_pool_size",
			)
		]
	return []


def _idle_timeout(d: Deployment, settings: dict) -> list[Finding]:
	timeout = _number(settings.get("client_idle_timeout"))
	if not timeout:
		return []
	if not d.config.max_idle or d.config.max_idle >= timeout:
		suggestion = max(1, int(timeout * 0.8))
		return [
			Finding(
				"warn",
				"client_idle_timeout",
				f"{d.site}: pgBouncer closes clients idle for {timeout:g}s but db_pool_max_idle={d.config.max_idle:g}: "
				"idle pooled connections get killed (detected at checkout, at the cost of a new login)",
				f"set db_pool_max_idle to {suggestion} (below client_idle_timeout)",
			)
		]
	return [Finding("ok", "client_idle_timeout", f"{d.site}: db_pool_max_idle below {timeout:g}s")]


def _lifetime(d: Deployment, settings: dict, mode: str) -> list[Finding]:
	lifetime = d.config.max_lifetime
	server_lifetime = _number(settings.get("server_lifetime"))
	if not lifetime:
		return [
			Finding(
				"warn",
				"max_lifetime",
				f"{d.site}: db_pool_max_lifetime=0: pooled clients never leave, so PAUSE, RECONNECT and a safe "
				"shutdown (SIGINT) of pgBouncer never finish while workers are busy",
				"set db_pool_max_lifetime, e.g. 600",
			)
		]
	if mode == "session" and server_lifetime and lifetime > server_lifetime:
		return [
			Finding(
				"warn",
				"server_lifetime",
				f"{d.site}: in session mode a server connection is recycled only when its client leaves, so "
				f"they live up to db_pool_max_lifetime={lifetime:g}s, not server_lifetime={server_lifetime:g}s",
				f"set db_pool_max_lifetime to {server_lifetime:g} or less",
			)
		]
	return [
		Finding(
			"ok",
			"max_lifetime",
			f"{d.site}: connections recycled within {lifetime:g}s: PAUSE and safe shutdown drain within that",
		)
	]


def render(findings: list[Finding]) -> str:
	marks = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR"}
	lines = []
	for f in findings:
		lines.append(f"{marks[f.level]} {f.check}: {f.message}")
		if f.fix:
			lines.append(f"      fix: {f.fix}")
	errors = sum(f.level == "error" for f in findings)
	warnings = sum(f.level == "warn" for f in findings)
	lines.append(f"{errors} errors, {warnings} warnings")
	return "\n".join(lines)
