"""The checks against each PostgreSQL server the bench's sites reach: the backends every pgBouncer and
direct site may open there, against max_connections (and the reserved slots), and what to set when they
do not fit."""

from __future__ import annotations

import psycopg2

from .bouncer import Bouncer, _number
from .dsn import describe_error
from .model import Bench, Connect, Finding, Site, _group, _pool_key, demand
from .postgres import Server, read_server
from .wording import _names, _no_session_reset, _plural

_READ_ERRORS = (psycopg2.Error, TimeoutError, LookupError)
POSTGRES_FIX = (
	"check the sites' db_host, db_port and credentials, or give doctor a DSN to PostgreSQL "
	"(pgpool_postgres_dsn in common_site_config.json, $PGPOOL_POSTGRES_DSN or --postgres-dsn)"
)


def _read_servers(
	bench: Bench, postgres: Connect | None, timeout: float
) -> tuple[dict[str, Server], dict[str, str], list[str], list[Finding]]:
	"""Each site's server (identity -> Server, site -> identity), what was read how, and failures."""
	servers: dict[str, Server] = {}
	of_site: dict[str, str] = {}
	checked: list[str] = []
	cache: dict[tuple, Server | Exception] = {}
	failed: dict[str, list[Site]] = {}
	for s in bench.sites:
		key = (s.address, s.dbname, s.user)
		if key not in cache:
			try:
				if s.connect is None:
					raise LookupError("no credentials given")
				cache[key] = read_server(s.connect, timeout)
			except _READ_ERRORS as e:
				cache[key] = e
		result = cache[key]
		if isinstance(result, Server):
			if result.identity not in servers:
				servers[result.identity] = result
				checked.append(
					f"PostgreSQL {result.name} ({result.version}), read with the credentials of {s.name}"
				)
			of_site[s.name] = result.identity
		else:
			failed.setdefault(describe_error(result), []).append(s)
	findings = []
	if failed and postgres is not None:
		try:
			server = read_server(postgres, timeout)
		except _READ_ERRORS as e:
			findings.append(
				Finding(
					"error",
					"postgres",
					f"cannot read PostgreSQL with the given DSN: {describe_error(e)}",
					POSTGRES_FIX,
				)
			)
		else:
			if server.identity not in servers:
				servers[server.identity] = server
				checked.append(f"PostgreSQL {server.name} ({server.version}), read with the PostgreSQL DSN")
			missing = [s for group in failed.values() for s in group]
			checked.append(
				f"{_names(missing)} assumed on {server.name} (their own credentials could not read it)"
			)
			of_site.update({s.name: server.identity for s in missing})
			failed = {}
	for reason, sites in failed.items():
		findings.append(
			Finding(
				"warn",
				"postgres",
				f"{_names(sites)}: PostgreSQL not checked: {reason}",
				POSTGRES_FIX,
			)
		)
	return servers, of_site, checked, findings


def _backends(
	bench: Bench, bouncers: dict[str, Bouncer], of_site: dict[str, str], identity: str, budget: object = None
) -> tuple[int, list[str], bool, bool]:
	"""Most backends the bench can open on one server: (total, parts, through pgBouncer, direct)."""
	total, parts = 0, []
	on_server = [s for s in bench.sites if of_site.get(s.name) == identity]
	for addr, b in bouncers.items():
		members = [s for s in on_server if s.address == addr]
		if members:
			opened = b.opened(bench, members, budget)
			pools = len(_group(members, _pool_key))
			parts.append(f"pgBouncer {addr}: {_plural(pools, 'pool')} may open {opened}")
			total += opened
	direct = [s for s in on_server if s.address not in bouncers]
	if direct:
		d = demand(bench, direct, budget)
		parts.append(f"{_names(direct)}, each connection a backend: {d.text}")
		total += d.total
	return total, parts, len(direct) < len(on_server), bool(direct)


def _check_servers(
	bench: Bench,
	bouncers: dict[str, Bouncer],
	examined: set[str],
	postgres: Connect | None,
	timeout: float,
) -> tuple[list[str], list[Finding]]:
	servers, of_site, checked, findings = _read_servers(bench, postgres, timeout)
	for identity, server in servers.items():
		total, parts, via_bouncer, direct = _backends(bench, bouncers, of_site, identity)
		if total <= server.limit:
			findings.append(
				Finding(
					"ok",
					"max_connections",
					f"PostgreSQL {server.name}: up to {total} backends from this bench ({'; '.join(parts)}) "
					f"within {server.limit_text}; {server.in_use} in use now",
				)
			)
			continue
		fixes = [
			f"raise max_connections to at least {total + server.superuser_reserved + server.reserved} plus "
			"your other clients (restarts PostgreSQL)"
		]
		auto, *_ = _backends(bench, bouncers, of_site, identity, budget="auto")
		if auto < total:
			fixes.append(
				"set db_pool_process_budget to auto (a process then keeps at most one connection per thread "
				f"across all sites: up to {auto})"
			)
		if via_bouncer:
			fixes += _bouncer_server_fixes(bench, bouncers, of_site, identity, server, total)
		if direct:
			fixes.append("put pgBouncer in front of the sites (see pool_mode)")
		fixes.append("run fewer workers or threads")
		findings.append(
			Finding(
				"error",
				"max_connections",
				f"PostgreSQL {server.name}: this bench can open up to {total} backends ({'; '.join(parts)}), "
				f"but it accepts {server.limit} ({server.limit_text}); {server.in_use} in use now. Beyond "
				"that, logins fail with 'too many clients already'",
				"; or ".join(fixes),
			)
		)
	direct = [s for s in bench.sites if s.address not in examined and s.name in of_site]
	if direct:
		checked.append(
			f"no pgBouncer examined in front of {_names(direct)}: checked as connecting straight to PostgreSQL"
		)
	findings += _no_session_reset(direct, "they connect straight to PostgreSQL (no pgBouncer examined)")
	for s in direct:
		server = servers[of_site[s.name]]
		port = s.address.rpartition(":")[2]
		if port and port != str(server.port):
			findings.append(
				Finding(
					"warn",
					"pgbouncer",
					f"{s.name} connects to {s.address} but PostgreSQL listens on port {server.port}: a pgBouncer "
					"or another proxy sits between, not examined (its clients were counted as backends)",
					"give doctor its admin console: pgbouncer_admin_dsn in common_site_config.json, "
					"$PGPOOL_ADMIN_DSN or --admin-dsn",
				)
			)
		idle = server.idle_session_timeout
		if s.pooled and idle and (not s.config.max_idle or s.config.max_idle >= idle):
			findings.append(
				Finding(
					"warn",
					"idle_session_timeout",
					f"{s.name}: PostgreSQL ends sessions idle for {idle:g}s but db_pool_max_idle="
					f"{s.config.max_idle:g}: idle pooled connections get killed (found at checkout, a new login)",
					f"set db_pool_max_idle to {max(1, int(idle * 0.8))}",
				)
			)
	return checked, findings


_LOWER_POOLS = "lower pgBouncer's pool sizes (or set max_db_connections) so that they fit"


def _bouncer_server_fixes(
	bench: Bench,
	bouncers: dict[str, Bouncer],
	of_site: dict[str, str],
	identity: str,
	server: Server,
	total: int,
) -> list[str]:
	"""What to set in pgBouncer so that its pools' servers fit the server: a per-pool cap for the
	transaction-mode pools, then smaller pools; or, when not even one server per transaction-mode pool
	fits, that no pgBouncer setting does (and nothing else)."""
	pools = 0
	kept = 0
	idle = []
	for addr, b in bouncers.items():
		members = [s for s in bench.sites if of_site.get(s.name) == identity and s.address == addr]
		tx = {key: m for key, m in _group(members, _pool_key).items() if b.mode(*key) != "session"}
		if tx:
			pools += len(tx)
			kept += b.opened(bench, [s for m in tx.values() for s in m])
			idle.append(_number(b.settings.get("server_idle_timeout", 600)))
	if not pools:
		return [_LOWER_POOLS]
	room = server.limit - (total - kept)  # what the rest of the bench leaves for these pools
	each = room // pools
	if each >= 1:
		return [
			f"cap each of the {pools} transaction-mode pools at {each} servers: default_pool_size={each} "
			f"and reserve_pool_size=0, or max_db_connections={each} (a database per site) or "
			f"max_user_connections={each} (a user per site), so that {pools} x {each} = {pools * each} fit "
			f"the {room} backends left; their busy sites' transactions queue in pgBouncer beyond it",
			_LOWER_POOLS,
		]
	need = pools + (total - kept) + server.superuser_reserved + server.reserved
	return [
		f"no pgBouncer setting fits: {pools} transaction-mode pools keep at least one server each while their "
		f"sites are busy (idle ones until server_idle_timeout={max(idle):g}s), and PostgreSQL leaves them "
		f"{room}: raise max_connections to at least {need} (an idle backend costs a few MiB: see "
		"docs/many-sites.md, 'Many sites behind a transaction pooler'), or spread the sites over more PostgreSQL servers, or lower "
		"server_idle_timeout so that quiet sites' servers go sooner (not a bound: busy sites keep theirs)"
	]
