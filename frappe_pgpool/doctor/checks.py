"""The checks: what the bench's processes can hold, held against each pgBouncer and each PostgreSQL server
they reach, and against the live processes; each finding with the numbers and the fix. examine() runs
them for a bench."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

import psycopg2

from ..pool import ConfigError
from ..pool.config import parse_process_budget
from .bouncer import Bouncer, _number
from .dsn import describe_error
from .model import Bench, Connect, Demand, Finding, Site, _group, _pool_key, demand
from .postgres import Server, read_server


def _with_auto_budget(bench: Bench, sites: Sequence[Site], current: Demand) -> str:
	"""The fix clause a budget offers for this demand, or ''."""
	auto = demand(bench, sites, budget="auto")
	if auto.total >= current.total:
		return ""
	return (
		"set db_pool_process_budget to auto (a process then keeps at most one connection per thread across "
		f"all sites: {auto.text})"
	)


def _with_fewer_clients(bench: Bench, sites: Sequence[Site], cap: int) -> str:
	"""The fix clause db_pool_process_clients offers to fit `cap` clients, or ''."""
	kept = [s for s in sites if s.client_budgeted]
	if not kept:
		return ""
	processes = bench.web + bench.jobs
	rest = demand(bench, [s for s in sites if not s.client_budgeted])
	per = (cap - rest.total) // processes
	if per < max(1, bench.threads):
		return ""
	return (
		f"set db_pool_process_clients to {per} in common_site_config.json ({processes} processes x {per} "
		"kept clients at most; a site beyond them logs in per request, as plain Frappe)"
	)


def _names(sites: Iterable[Site]) -> str:
	names = sorted({s.name for s in sites})
	if len(names) <= 3:
		return ", ".join(names)
	return f"{len(names)} sites ({names[0]}, {names[1]}, ..., {names[-1]})"


def _plural(count: int, word: str) -> str:
	return f"{count} {word}" + ("" if count == 1 else "s")


# --- pgBouncer ---


ADMIN_FIX = (
	"give pgbouncer_admin_dsn (common_site_config.json, $PGPOOL_ADMIN_DSN or --admin-dsn) a user "
	"listed in pgBouncer's admin_users or stats_users, with dbname=pgbouncer"
)


def _check_bouncer(bench: Bench, b: Bouncer, sites: list[Site]) -> list[Finding]:
	findings: list[Finding] = []
	pools = _group(sites, _pool_key)
	modes = {key: b.mode(*key) for key in pools}
	session = [s for key, members in pools.items() if modes[key] == "session" for s in members]
	if session:
		findings.append(
			Finding(
				"ok",
				"pool_mode",
				f"{_names(session)}: session mode: a client pins a server connection while it stays "
				"connected, idle or not, so all the bench's pooled clients must fit (pool size, below)",
			)
		)
	pooled_by_mode: dict[str, list[Site]] = {}  # one finding per mode, not per pool (a bench may have 500)
	for key, members in pools.items():
		if modes[key] != "session":
			pooled_by_mode.setdefault(modes[key], []).extend(members)
		else:
			findings += _no_session_reset(members, f"pgBouncer {b.address} runs them in session mode")
	findings += [_pool_mode(members, mode) for mode, members in pooled_by_mode.items()]
	findings += _pool_sizes(bench, b, pools, modes)
	findings += _server_caps(bench, b, pools, modes)
	findings += _client_caps(bench, b, pools)
	total = demand(bench, sites)
	max_client = int(_number(b.settings.get("max_client_conn")))
	if max_client and total.total > max_client:
		findings.append(
			Finding(
				"error",
				"max_client_conn",
				f"pgBouncer {b.address}: the bench's processes can hold {total.text} clients for "
				f"{_names(sites)}; it accepts max_client_conn={max_client}",
				"; or ".join(
					filter(
						None,
						[
							f"raise max_client_conn to at least {total.total} plus your other clients",
							_with_auto_budget(bench, sites, total),
							_with_fewer_clients(bench, sites, max_client),
							"lower db_pool_size",
						],
					)
				),
			)
		)
	elif max_client:
		findings.append(
			Finding(
				"ok",
				"max_client_conn",
				f"{total.total} pooled clients at most ({total.text}), max_client_conn={max_client}",
			)
		)
	findings += _waiting(b, pools)
	findings += _transaction_servers(bench, b, pools, modes)
	findings += _idle_timeout(sites, b.settings)
	findings += _lifetime(sites, b.settings, lambda s: modes[_pool_key(s)])
	retry = _number(b.settings.get("server_login_retry"))
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


def _pool_mode(members: list[Site], mode: str) -> Finding:
	fix = "use pool_mode = session for Frappe databases, with pools sized as the pool size check says"
	resetting = [s for s in members if s.pooled and s.config.pgbouncer_mode == "session"]
	if resetting:
		fix += (
			f'; or keep {mode} mode and set db_pool_pgbouncer_mode to "transaction" for {_names(resetting)}: '
			"their return now sends a session reset, a round trip that runs on whichever server pgBouncer "
			"lends for it, and their connections carry an application_name per worker, which pgBouncer SETs "
			"on the server before nearly every transaction"
		)
	return Finding(
		"warn",
		"pool_mode",
		f"{_names(members)}: pool_mode is {mode}: a server connection is held only during a transaction, so "
		"idle clients pin none (many sites x workers fit a small pool), but Frappe's session state (SET, "
		"temp tables, advisory locks, LISTEN) does not follow a client across transactions there",
		fix,
	)


def _no_session_reset(members: list[Site], why: str) -> list[Finding]:
	"""Sites set to pgBouncer transaction mode whose connections are real sessions: nothing resets them."""
	wrong = [s for s in members if s.pooled and s.config.pgbouncer_mode == "transaction"]
	if not wrong:
		return []
	return [
		Finding(
			"error",
			"db_pool_pgbouncer_mode",
			f"{_names(wrong)}: db_pool_pgbouncer_mode is transaction but {why}: the return sends no session "
			"reset, so what a request leaves in its session (SET, temp tables, advisory locks, LISTEN) reaches "
			"the next request served by that connection",
			'remove db_pool_pgbouncer_mode (or set it to "session") for these sites',
		)
	]


def _pool_sizes(bench: Bench, b: Bouncer, pools: dict, modes: dict) -> list[Finding]:
	findings, fitting = [], []
	wait = b.settings.get("query_wait_timeout", "120")
	for (db, user), members in pools.items():
		size, reserve = b.size(db, user), b.reserve(db, user)
		if modes[(db, user)] != "session":
			active = demand(bench, members, active=True)
			if active.total > size + reserve:
				findings.append(
					Finding(
						"warn",
						"pool size",
						f"pgBouncer pool {db}/{user}, for {_names(members)}: up to {active.text} transactions at "
						f"once for {size} server connections (+{reserve} reserve): the excess queues in pgBouncer",
						f"raise {b.size_setting(db, user)} to {active.total} if those waits show in SHOW POOLS "
						"(cl_waiting)",
					)
				)
			else:
				fitting.append((active.total, size + reserve, db, user, "transactions"))
			continue
		d = demand(bench, members)
		if d.total <= size + reserve:
			fitting.append((d.total, size + reserve, db, user, "clients"))
			continue
		fixes = [
			f"raise {b.size_setting(db, user)} to at least {d.total}, within PostgreSQL's max_connections",
			_with_auto_budget(bench, members, d),
			"lower db_pool_size or the number of workers",
			"use pool_mode = transaction if your apps keep no session state (see pool_mode)",
		]
		findings.append(
			Finding(
				"error",
				"pool size",
				f"pgBouncer pool {db}/{user}, for {_names(members)}: {d.text} clients, but the pool has {size} "
				f"server connections (+{reserve} reserve); in session mode each client pins one, so the "
				f"excess waits, then fails after query_wait_timeout={wait}s",
				"; or ".join(filter(None, fixes)),
			)
		)
	if fitting:
		need, cap, db, user, what = max(fitting, key=lambda f: f[0] / max(f[1], 1))
		fullest = f"{db}/{user}, {need} {what} at most for {cap} server connections"
		findings.append(
			Finding(
				"ok",
				"pool size",
				f"pgBouncer pool {fullest}"
				if len(fitting) == 1
				else f"{len(fitting)} pgBouncer pools fit; the fullest: {fullest}",
			)
		)
	return findings


def _server_caps(bench: Bench, b: Bouncer, pools: dict, modes: dict) -> list[Finding]:
	"""max_db_connections and max_user_connections, over the pools that share a database or a user."""
	findings = []
	for axis, index, setting in (("database", 0, "max_db_connections"), ("user", 1, "max_user_connections")):
		groups = _group(pools, lambda key, i=index: key[i])
		for name, keys in groups.items():
			cap = b.max_db(name) if axis == "database" else b.max_user(name)
			if not cap:
				continue
			members = [s for key in keys for s in pools[key]]
			opened = b.opened(bench, members, capped=False)
			if opened > cap and all(modes[key] != "session" for key in keys):
				findings.append(
					Finding(
						"warn",
						setting,
						f"pgBouncer {axis} {name} ({_names(members)}): up to {opened} transactions at once, but "
						f"{setting}={cap}: the excess queues in pgBouncer for a server (SHOW POOLS cl_waiting)",
						f"raise {setting} to {opened} if those waits show, within PostgreSQL's max_connections "
						"(see max_connections)",
					)
				)
			elif opened > cap:
				findings.append(
					Finding(
						"error",
						setting,
						f"pgBouncer {axis} {name} ({_names(members)}): its pools may open {opened} server "
						f"connections, but {setting}={cap}: the excess clients wait, then fail",
						f"raise {setting} to at least {opened}, or lower the pools' size or db_pool_size",
					)
				)
	return findings


def _client_caps(bench: Bench, b: Bouncer, pools: dict) -> list[Finding]:
	"""max_db_client_connections and max_user_client_connections (pgBouncer 1.24+): client caps of a
	database or a user over all its pools; a client over them is refused at login, in any pool_mode."""
	findings = []
	for axis, index, setting in (
		("database", 0, "max_db_client_connections"),
		("user", 1, "max_user_client_connections"),
	):
		for name, keys in _group(pools, lambda key, i=index: key[i]).items():
			cap = b.max_db_clients(name) if axis == "database" else b.max_user_clients(name)
			if not cap:
				continue
			members = [s for key in keys for s in pools[key]]
			clients = demand(bench, members)
			if clients.total > cap:
				findings.append(
					Finding(
						"error",
						setting,
						f"pgBouncer {axis} {name} ({_names(members)}): the bench's processes can hold "
						f"{clients.text} clients, but {setting}={cap}: the excess is refused at login",
						"; or ".join(
							filter(
								None,
								[
									f"raise {setting} to at least {clients.total}",
									_with_auto_budget(bench, members, clients),
									_with_fewer_clients(bench, members, cap),
									"lower db_pool_size",
								],
							)
						),
					)
				)
	return findings


def _transaction_servers(bench: Bench, b: Bouncer, pools: dict, modes: dict) -> list[Finding]:
	"""What the transaction-mode pools keep open on PostgreSQL: a server lent to a kept client comes back
	to its pool idle (plain Frappe disconnects inside its transaction, so pgBouncer drops that server) and
	stays until server_idle_timeout, so each pool keeps about the most transactions it ran at once lately.
	PostgreSQL's side of it is the max_connections check."""
	kept = [(key, members) for key, members in pools.items() if modes[key] != "session"]
	if not any(s.client_budgeted for _, members in kept for s in members):
		return _clients_offer(bench, b, kept)
	kept = [(key, members) for key, members in kept if any(s.client_budgeted for s in members)]
	idle = _number(b.settings.get("server_idle_timeout", 600))
	sites = [s for _, members in kept for s in members]
	most = b.opened(bench, sites)
	per = sorted({b.pool_servers(bench, members, *key) for key, members in kept})
	shown = f"{per[0]}" if len(per) == 1 else f"{per[0]} to {per[-1]}"
	after = f"server_idle_timeout={idle:g}s" if idle else "never (server_idle_timeout=0)"
	return [
		Finding(
			"warn" if not idle else "ok",
			"server_idle_timeout",
			f"{_plural(len(kept), 'pool')} in transaction mode with kept clients ({_names(sites)}): each keeps "
			f"the servers it needed at once, {shown} at most (pool_size + reserve, transactions in flight, "
			f"min_pool_size), idle ones until {after}: up to {most} servers in all (max_db_connections and "
			"max_user_connections applied); a quiet site's go when it stays quiet that long",
			""
			if idle
			else "set server_idle_timeout (e.g. 60) so that the servers of sites gone quiet are closed",
		)
	]


def _clients_offer(bench: Bench, b: Bouncer, pools: list) -> list[Finding]:
	"""Transaction-mode pools under the peak rule (db_pool_process_clients unset): what keeping a client per
	site would cost in servers, with these pgBouncer settings, so that the operator can opt in knowingly."""
	sites = [s for _, members in pools for s in members if s.transaction_pooled]
	if not sites:
		return []
	opted = [replace(s, process_clients=100) for s in sites]
	most = b.opened(bench, opted)
	idle = _number(b.settings.get("server_idle_timeout", 600))
	return [
		Finding(
			"ok",
			"db_pool_process_clients",
			f"{_names(sites)}: pooled in transaction mode under db_pool_process_budget (a process keeps at most "
			"plain Frappe's peak of connections; a site beyond them logs in per request). With "
			"db_pool_process_clients set, a process keeps a client per site instead (README: 'Many sites "
			"behind a transaction pooler'), and each site's pool keeps the servers it used idle until "
			f"server_idle_timeout={idle:g}s: up to {most} servers with these pgBouncer settings",
			f"to opt in, set db_pool_process_clients (e.g. 100) in common_site_config.json only if PostgreSQL "
			f"accepts {most} more backends besides the rest; run doctor again: its max_connections check then "
			"counts them",
		)
	]


def _waiting(b: Bouncer, pools: dict) -> list[Finding]:
	dbs = {db for db, _ in pools}
	waiting = {}
	for p in b.pools:
		if p.get("database") in dbs and int(p.get("cl_waiting") or 0):
			waiting[p["database"]] = waiting.get(p["database"], 0) + int(p["cl_waiting"])
	if not waiting:
		return []
	return [
		Finding(
			"warn",
			"cl_waiting",
			"clients waiting for a server connection right now: "
			+ ", ".join(f"{db}: {n}" for db, n in sorted(waiting.items())),
			"see SHOW POOLS; raise those pools' pool_size or lower db_pool_size (or set db_pool_process_budget)",
		)
	]


def _idle_timeout(sites: list[Site], settings: dict) -> list[Finding]:
	timeout = _number(settings.get("client_idle_timeout"))
	pooled = [s for s in sites if s.pooled]
	if not timeout or not pooled:
		return []
	bad = [s for s in pooled if not s.config.max_idle or s.config.max_idle >= timeout]
	if bad:
		values = "/".join(f"{v:g}" for v in sorted({s.config.max_idle for s in bad}))
		return [
			Finding(
				"warn",
				"client_idle_timeout",
				f"{_names(bad)}: pgBouncer closes clients idle for {timeout:g}s but db_pool_max_idle={values}: "
				"idle pooled connections get killed (detected at checkout, at the cost of a new login)",
				f"set db_pool_max_idle to {max(1, int(timeout * 0.8))} (below client_idle_timeout)",
			)
		]
	return [Finding("ok", "client_idle_timeout", f"{_names(pooled)}: db_pool_max_idle below {timeout:g}s")]


def _lifetime(sites: list[Site], settings: dict, mode_of: Callable[[Site], str]) -> list[Finding]:
	pooled = [s for s in sites if s.pooled]
	server_lifetime = _number(settings.get("server_lifetime"))
	never = [s for s in pooled if not s.config.max_lifetime]
	longer = [
		s
		for s in pooled
		if s.config.max_lifetime
		and mode_of(s) == "session"
		and server_lifetime
		and s.config.max_lifetime > server_lifetime
	]
	findings = []
	if never:
		findings.append(
			Finding(
				"warn",
				"max_lifetime",
				f"{_names(never)}: db_pool_max_lifetime=0: pooled clients never leave, so PAUSE, RECONNECT and a "
				"safe shutdown (SIGINT) of pgBouncer never finish while workers are busy",
				"set db_pool_max_lifetime, e.g. 600",
			)
		)
	if longer:
		values = "/".join(f"{v:g}" for v in sorted({s.config.max_lifetime for s in longer}))
		findings.append(
			Finding(
				"warn",
				"server_lifetime",
				f"{_names(longer)}: in session mode a server connection is recycled only when its client leaves, "
				f"so they live up to db_pool_max_lifetime={values}s, not server_lifetime={server_lifetime:g}s",
				f"set db_pool_max_lifetime to {server_lifetime:g} or less",
			)
		)
	rest = [s for s in pooled if s not in never and s not in longer]
	if rest:
		longest = max(s.config.max_lifetime for s in rest)
		findings.append(
			Finding(
				"ok",
				"max_lifetime",
				f"{_names(rest)}: connections recycled within {longest:g}s: PAUSE and safe shutdown drain "
				"within that",
			)
		)
	return findings


# --- PostgreSQL ---


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
			fixes += _transaction_server_fixes(bench, bouncers, of_site, identity, server, total)
			fixes.append("lower pgBouncer's pool sizes (or set max_db_connections) so that they fit")
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


def _transaction_server_fixes(
	bench: Bench,
	bouncers: dict[str, Bouncer],
	of_site: dict[str, str],
	identity: str,
	server: Server,
	total: int,
) -> list[str]:
	"""What to set so that the transaction-mode pools' servers fit the server: a per-pool cap, or, when
	not even one server per pool fits, that no pgBouncer setting does."""
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
		return []
	room = server.limit - (total - kept)  # what the rest of the bench leaves for these pools
	each = room // pools
	if each >= 1:
		return [
			f"cap each of the {pools} transaction-mode pools at {each} servers: default_pool_size={each} "
			f"and reserve_pool_size=0, or max_db_connections={each} (a database per site) or "
			f"max_user_connections={each} (a user per site), so that {pools} x {each} = {pools * each} fit "
			f"the {room} backends left; their busy sites' transactions queue in pgBouncer beyond it"
		]
	need = pools + (total - kept) + server.superuser_reserved + server.reserved
	return [
		f"no pgBouncer setting fits: {pools} transaction-mode pools keep at least one server each while their "
		f"sites are busy (idle ones until server_idle_timeout={max(idle):g}s), and PostgreSQL leaves them "
		f"{room}: raise max_connections to at least {need} (an idle backend costs a few MiB: see README, "
		"'Many sites on one bench'), or spread the sites over more PostgreSQL servers, or lower "
		"server_idle_timeout so that quiet sites' servers go sooner (not a bound: busy sites keep theirs)"
	]


# --- the whole bench ---


def examine(
	bench: Bench,
	bouncers: Mapping[str, Connect] | None = None,
	postgres: Connect | None = None,
	timeout: float = 10.0,
) -> list[Finding]:
	"""Check the bench: against each pgBouncer whose admin console `bouncers` maps by address (the
	sites with that address are behind it), and against every PostgreSQL server its sites reach, read
	with each site's own credentials (or `postgres`, a connection to the server, where they fail).
	Sites at other addresses are checked as connecting straight to PostgreSQL."""
	findings: list[Finding] = []
	checked: list[str] = []
	read: dict[str, Bouncer] = {}
	for addr, connect in (bouncers or {}).items():
		sites = [s for s in bench.sites if s.address == addr]
		try:
			read[addr] = b = Bouncer.read(addr, connect)
		except psycopg2.Error as e:
			findings.append(
				Finding(
					"error",
					"admin console",
					f"cannot query pgBouncer's admin console at {addr}: {describe_error(e)}",
					ADMIN_FIX,
				)
			)
			continue
		checked.append(
			f"pgBouncer {addr} (admin console), in front of {_names(sites) or 'no site of this bench'}"
		)
		findings += _check_bouncer(bench, b, sites)
	server_checked, server_findings = _check_servers(bench, read, set(bouncers or {}), postgres, timeout)
	findings += _budget_consistency(bench)
	findings += _threads_above_size(bench)
	return [Finding("ok", "checked", text) for text in checked + server_checked] + findings + server_findings


def _budget_consistency(bench: Bench) -> list[Finding]:
	"""db_pool_process_budget is process-wide: a process applies the value of the site it is serving, so
	sites that disagree make it change at every request for another site (lowered: idle connections are
	closed; raised: waiters are let in), and doctor can only count on the largest."""
	values: dict[str, list[Site]] = {}
	for s in bench.sites:
		if s.pooled:
			try:  # as the process reads it: " Auto " is auto, "4" is 4
				setting = parse_process_budget(s.process_budget)
				value = "auto" if setting is None else str(setting)
			except ConfigError:
				value = repr(s.process_budget)
			values.setdefault(value, []).append(s)
	if len(values) < 2:
		return []
	shown = "; ".join(f"{value} for {_names(members)}" for value, members in sorted(values.items()))
	return [
		Finding(
			"warn",
			"db_pool_process_budget",
			f"the sites disagree on db_pool_process_budget ({shown}): it is process-wide, so every process "
			"switches budgets with the site of each request",
			"set it once in common_site_config.json and remove it from the sites' site_config.json",
		)
	]


def _threads_above_size(bench: Bench) -> list[Finding]:
	"""db_pool_size is the most connections a process keeps per site, not the most it opens: a web worker
	with more threads than that serves the requests beyond it (those running at once for one site) with
	connections opened and closed per request, as plain Frappe serves them: never a wait, but a login each."""
	pooled = [s for s in bench.sites if s.pooled]
	below = [s for s in pooled if s.config.size < bench.threads]
	if not below:
		if pooled and bench.threads > 1:
			return [
				Finding(
					"ok",
					"db_pool_size",
					f"{_names(pooled)}: db_pool_size at least the {bench.threads} threads per web worker",
				)
			]
		return []
	sizes = "/".join(str(size) for size in sorted({s.config.size for s in below}))
	return [
		Finding(
			"warn",
			"db_pool_size",
			f"{_names(below)}: db_pool_size={sizes} is below the {bench.threads} threads per web worker: the "
			"requests a worker runs at once for one site beyond it are served by connections opened and "
			"closed per request, as plain Frappe serves them (a login each, no wait)",
			f"set db_pool_size to {bench.threads} (common_site_config.json, or each site's site_config.json), "
			"within pgBouncer's pool size (see pool size)",
		)
	]


ARMED_FIX = (
	"the app's package is not installed in this environment's site-packages; reinstall with pip install / "
	"bench get-app, then restart"
)
_ARMED = {
	"hook": "armed late, by a request or job hook: connections opened before it bypassed the pool",
	"no": "not armed: every connection bypasses the pool",
}


def check_processes(reports: Iterable[dict]) -> list[Finding]:
	"""Live processes (published reports) that did not arm the pool at interpreter start."""
	processes: dict[tuple, dict] = {}
	for report in reports:
		processes.setdefault((report.get("host"), report.get("pid")), report)
	late = [r for r in processes.values() if r.get("armed") not in (None, "start")]
	unknown = sum("armed" not in r for r in processes.values())
	if late:
		states = sorted({str(r.get("armed")) for r in late})
		return [
			Finding(
				"error",
				"armed",
				f"{len(late)} of {len(processes)} live processes did not arm the pool at interpreter start: "
				+ ", ".join(
					f"{r.get('role')} {r.get('pid')}@{r.get('host')} ({r.get('armed')})" for r in late[:10]
				)
				+ (", ..." if len(late) > 10 else "")
				+ "; "
				+ "; ".join(f"{state}: {_ARMED.get(state, 'unknown state')}" for state in states),
				ARMED_FIX,
			)
		]
	if not processes:
		return []
	if unknown:
		return [
			Finding(
				"ok",
				"armed",
				f"{len(processes) - unknown} live processes armed at start; {unknown} do not say (an older "
				"frappe_pgpool, until they restart)",
			)
		]
	return [
		Finding("ok", "armed", f"all {len(processes)} live processes armed the pool at interpreter start")
	]
