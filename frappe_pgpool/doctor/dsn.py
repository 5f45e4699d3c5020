"""The DSNs doctor connects with: where each comes from (option, environment, config, prompt), the
host:port that sites and DSNs name, and what of a DSN or of libpq's errors is safe to show."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions

from ..publish import redacted
from .model import Finding

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
		parsed = psycopg2.extensions.parse_dsn(dsn)
		return parsed.get("password") or parsed.get("sslpassword") or None
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
		if not self.dsn:
			return "(none)"
		try:
			psycopg2.extensions.parse_dsn(self.dsn)
		except psycopg2.Error:  # where its password ends is anyone's guess
			return "(a malformed DSN, not shown)"
		return redacted(self.dsn)

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
					"common_site_config.json, or keep it out of the DSN and put it in ~/.pgpass (or PGPASSFILE)"
					+ (", or use --ask-password" if option == "--admin-dsn" else ""),
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


POSTGRES_DSN_ENV = "PGPOOL_POSTGRES_DSN"
POSTGRES_DSN_KEYS = ("pgpool_postgres_dsn",)


def resolve_postgres_dsn(
	option_dsn: str | None, conf: Mapping[str, object], environ: Mapping[str, str]
) -> ResolvedDsn:
	"""A DSN to PostgreSQL itself (any database and role: the settings and pg_stat_activity's count are
	readable by all), for sites whose own credentials cannot read their server: --postgres-dsn, else
	$PGPOOL_POSTGRES_DSN, else pgpool_postgres_dsn in the config."""
	return _resolve("--postgres-dsn", option_dsn, POSTGRES_DSN_ENV, POSTGRES_DSN_KEYS, conf, environ, None)


_LOOPBACK = {"", "localhost", "127.0.0.1", "::1"}


def address(host: object, port: object) -> str:
	"""host:port as a site config or a DSN names it; loopback names, sockets and the default port made alike."""
	host = str(host or "")
	if host in _LOOPBACK or host.startswith("/"):
		host = "localhost"
	return f"{host}:{port or 5432}"


def dsn_address(dsn: str | None) -> str:
	try:
		parts = psycopg2.extensions.parse_dsn(dsn or "")
	except psycopg2.Error:
		return ""
	return address(parts.get("host"), parts.get("port"))
