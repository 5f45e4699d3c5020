"""The checks against one pgBouncer, from its admin console: pool mode, pool sizes, server and client
caps, servers kept in transaction mode, timeouts and lifetimes, each held against what the bench's
processes can hold at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .bouncer import Bouncer, _number
from .model import Bench, Finding, Site, _group, _pool_key, demand
from .wording import _client_cap_fix, _names, _no_session_reset, _plural, _with_auto_budget

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
				_client_cap_fix(
					bench,
					sites,
					total,
					max_client,
					f"raise max_client_conn to at least {total.total} plus your other clients",
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
						_client_cap_fix(
							bench, members, clients, cap, f"raise {setting} to at least {clients.total}"
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
			"client budget",
			f"{_names(sites)}: pooled in transaction mode under db_pool_process_budget (a process keeps at most "
			"plain Frappe's peak of connections; a site beyond them logs in per request). With "
			"db_pool_process_clients set, a process keeps a client per site instead (docs/many-sites.md: 'Many sites "
			"behind a transaction pooler'), and each site's pool keeps the servers it used idle until "
			f"server_idle_timeout={idle:g}s: up to {most} servers with these pgBouncer settings",
			"to opt in, run doctor with --apply: it sets db_pool_process_clients in common_site_config.json to "
			"the largest value every check accepts, or leaves it off; or set it yourself (e.g. 100) only if "
			f"PostgreSQL accepts {most} more backends besides the rest, and run doctor again: its "
			"max_connections check then counts them",
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
