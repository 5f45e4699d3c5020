"""The whole bench's checks: examine() runs the pgBouncer checks (bouncer_checks) and the PostgreSQL
checks (server_checks) for a bench, then those of the bench itself (budgets that disagree, threads above
db_pool_size) and of its live processes (check_processes)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import psycopg2

from ..pool import ConfigError
from ..pool.config import parse_process_budget
from .bouncer import Bouncer
from .bouncer_checks import ADMIN_FIX, _check_bouncer
from .dsn import describe_error
from .model import Bench, Connect, Finding, Site, _clients_floor
from .server_checks import POSTGRES_FIX, _check_servers
from .wording import _names

__all__ = ["ADMIN_FIX", "ARMED_FIX", "POSTGRES_FIX", "_check_bouncer", "check_processes", "examine"]


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
	"""db_pool_process_budget and db_pool_process_clients are process-wide: a process applies the values of
	the site it is serving, so sites that disagree make it change at every request for another site
	(a budget lowered: idle connections are closed; raised: waiters are let in; the client budget switched
	off: its kept clients are closed, on: its pools are made again), and doctor can only count on the
	largest."""
	findings = []
	for key, value_of, why in (
		("db_pool_process_budget", _budget_text, "switches budgets"),
		("db_pool_process_clients", _clients_text, "switches the client budget on, off or between sizes"),
	):
		values: dict[str, list[Site]] = {}
		for s in bench.sites:
			if s.pooled:
				values.setdefault(value_of(s), []).append(s)
		if len(values) < 2:
			continue
		shown = "; ".join(f"{value} for {_names(members)}" for value, members in sorted(values.items()))
		findings.append(
			Finding(
				"warn",
				key,
				f"the sites disagree on {key} ({shown}): it is process-wide, so every process {why} with the "
				"site of each request",
				"set it once in common_site_config.json and remove it from the sites' site_config.json",
			)
		)
	return findings


def _budget_text(s: Site) -> str:
	try:  # as the process reads it: " Auto " is auto, "4" is 4
		setting = parse_process_budget(s.process_budget)
		return "auto" if setting is None else str(setting)
	except ConfigError:
		return repr(s.process_budget)


def _clients_text(s: Site) -> str:
	"""db_pool_process_clients as a process applies it (unset, "auto" and a bad value: off)."""
	floor = _clients_floor(s.process_clients)
	return str(floor) if floor else "auto"


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
