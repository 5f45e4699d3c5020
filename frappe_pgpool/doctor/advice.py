"""What `bench pgpool doctor --apply` sets: db_pool_process_clients, the opt-in client budget of the sites
pooled in pgBouncer transaction mode.

Opting in keeps a pgBouncer client per site in every process, and about one idle PostgreSQL backend per
site served lately in pgBouncer's pools: safe only where pgBouncer's settings bound those servers within
PostgreSQL's max_connections, which a worker cannot read (it has no admin console). doctor can: so the
value is the largest (a client of every such site, or the most the client caps accept) whose worst case
every check accepts, checked by examine() on the bench as it would be with it; where none is, the key
goes (plain Frappe's peak, the default). Only where doctor can tell: every check passes with the key
off and reads what it needs (pgBouncer's admin console, PostgreSQL's limits); else nothing changes. No
I/O of its own: examine() reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..pool.config import PROCESS_BUDGET_MAX, PROCESS_CLIENTS_KEY
from .checks import ADMIN_FIX, POSTGRES_FIX, examine
from .model import Bench, Connect, Finding
from .wording import _names

# the checks a smaller client budget can satisfy: clients, not servers (a pool keeps the servers it
# needed at once whatever number of clients each process keeps)
CLIENT_CAPS = frozenset({"max_client_conn", "max_db_client_connections", "max_user_client_connections"})


@dataclass(frozen=True)
class ClientsAdvice:
	"""What to do with db_pool_process_clients: set it to `value`; remove it (`value` None, `decided`: it
	does not fit); or, not `decided`, leave it as it is (doctor cannot tell: something it must count was
	not read, or is wrong already). `reason` and `fix` say why; `refused` holds the errors that refused the
	last value tried, `accepted` the findings on clients and servers of the value set."""

	value: int | None
	reason: str
	fix: str = ""
	refused: tuple[Finding, ...] = ()
	accepted: tuple[Finding, ...] = ()
	decided: bool = True
	applies: bool = True  # False: no site in transaction mode, nothing to decide


def advise_process_clients(
	bench: Bench,
	bouncers: Mapping[str, Connect] | None,
	postgres: Connect | None = None,
	timeout: float = 10.0,
	overriding: Sequence[str] = (),
	known: Sequence[Finding] = (),
) -> ClientsAdvice:
	"""The largest db_pool_process_clients whose worst case fits every pgBouncer and PostgreSQL server
	of the bench, None where none does, or no decision. `overriding`: sites that set the key in their own
	site_config.json (which the written value would not reach); `known`: findings made before the bench
	was built (a site left out for a bad setting is not counted, so nothing is decided)."""
	tx = [s for s in bench.sites if s.transaction_pooled]
	if not tx:
		return ClientsAdvice(
			None,
			"no pooled site is in pgBouncer transaction mode (db_pool_pgbouncer_mode): "
			f"{PROCESS_CLIENTS_KEY} does not apply",
			decided=False,
			applies=False,
		)
	unseen = [s for s in tx if s.address not in (bouncers or {})]
	if unseen:
		return _undecided(
			f"{_names(unseen)}: no pgBouncer admin console examined in front of them, so the servers their "
			"pools would keep cannot be counted",
			ADMIN_FIX,
		)
	if overriding:
		return _undecided(
			f"{', '.join(overriding)} set {PROCESS_CLIENTS_KEY} in their own site_config.json, which "
			"overrides common_site_config.json: a value written there would not be the one they run with",
			f"remove {PROCESS_CLIENTS_KEY} from their site_config.json, then run --apply again",
		)
	skipped = [f for f in known if f.level == "error" and f.check == "site config"]
	if skipped:
		return _undecided(
			"sites left out of the count for a bad setting: " + "; ".join(f.message for f in skipped),
			"fix their site_config.json, then run --apply again",
		)
	floor = max(1, bench.threads)  # a process keeps its peak of checkouts anyway
	if floor > PROCESS_BUDGET_MAX:
		return _undecided(
			f"{bench.threads} threads per web worker: above {PROCESS_CLIENTS_KEY}'s range",
			f"run fewer threads per web worker (at most {PROCESS_BUDGET_MAX})",
		)
	# With the client budget off, every check must read what it needs and pass: an error then is not the
	# value's doing, and whatever a later trial refuses is
	baseline = examine(_with_clients(bench, "auto"), bouncers, postgres, timeout)
	blind = _blind(baseline)
	errors = [f for f in baseline if f.level == "error"]
	if blind or errors:
		return _undecided(
			blind or "doctor finds errors with the client budget off: " + "; ".join(_said(errors)),
			"; ".join(dict.fromkeys(f.fix for f in errors if f.fix)) or POSTGRES_FIX,
		)
	value = max(floor, min(PROCESS_BUDGET_MAX, len(tx)))  # a client of every such site in every process
	best: ClientsAdvice | None = None  # the largest value that fits so far
	above = None  # the smallest value a client cap refused
	while True:
		findings = examine(_with_clients(bench, value), bouncers, postgres, timeout)
		blind = _blind(findings)
		if blind:  # a read failed between two trials
			return _undecided(blind, POSTGRES_FIX)
		refused = tuple(f for f in findings if f.level == "error")
		if not refused:
			counted = ("max_client_conn", "max_connections", "server_idle_timeout")
			best = ClientsAdvice(
				value,
				f"{_names(tx)}: with {PROCESS_CLIENTS_KEY}={value} every check passes (a process keeps a "
				f"client for up to {value} of the {len(tx)} sites in transaction mode)",
				accepted=tuple(f for f in findings if f.check in counted),
			)
		elif value > floor and all(f.check in CLIENT_CAPS for f in refused):
			above = value  # fewer clients kept per process fit the client caps: look below
		else:  # the servers refuse it: fewer clients per process would not change them
			return ClientsAdvice(
				None,
				f"{_names(tx)}: with {PROCESS_CLIENTS_KEY}={value} (off: every check passes) doctor finds "
				+ "; ".join(_said(refused)),
				"; ".join(dict.fromkeys(f.fix for f in refused if f.fix)),
				refused,
			)
		if above is None or (best is not None and above - best.value <= 1):
			return best  # type: ignore[return-value]  # above is None only once a value fit
		# halve until a value fits, then bisect between it and the smallest refused
		value = max(floor, above // 2) if best is None else (best.value + above) // 2


def _with_clients(bench: Bench, value: object) -> Bench:
	return dataclasses.replace(
		bench, sites=tuple(dataclasses.replace(s, process_clients=value) for s in bench.sites)
	)


def _blind(findings: Sequence[Finding]) -> str:
	"""Why these findings cannot decide (something not read), or ''."""
	unread = [f for f in findings if f.check in ("postgres", "admin console") and f.level != "ok"]
	unread += [f for f in findings if f.check == "pgbouncer" and f.level != "ok"]  # a proxy not examined
	if unread:
		return "not everything was read: " + "; ".join(_said(unread))
	if not any(f.check == "max_connections" for f in findings):
		return "PostgreSQL's max_connections was not read"
	return ""


def _said(findings: Sequence[Finding]) -> list[str]:
	return [f"{f.check}: {f.message}" for f in findings]


def _undecided(reason: str, fix: str = "") -> ClientsAdvice:
	return ClientsAdvice(None, reason, fix, decided=False)
