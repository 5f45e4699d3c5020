"""How findings are worded: the sites they name, and the fix clauses the process budgets offer."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .model import Bench, Demand, Finding, Site, demand


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
	names = sorted({s.name for s in sites}, key=_natural)
	if len(names) <= 3:
		return ", ".join(names)
	return f"{len(names)} sites ({names[0]}, {names[1]}, ..., {names[-1]})"


def _natural(name: str) -> list:
	"""site9 before site10: digit runs compare as numbers."""
	return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _plural(count: int, word: str) -> str:
	return f"{count} {word}" + ("" if count == 1 else "s")


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


def _client_cap_fix(bench: Bench, sites: Sequence[Site], clients: Demand, cap: int, raise_it: str) -> str:
	"""The fixes for more clients than a pgBouncer client cap allows: raise it (`raise_it`), or hold fewer
	(the auto budget, fewer kept clients), or a smaller db_pool_size."""
	fixes = [raise_it, _with_auto_budget(bench, sites, clients), _with_fewer_clients(bench, sites, cap)]
	return "; or ".join(filter(None, [*fixes, "lower db_pool_size"]))
