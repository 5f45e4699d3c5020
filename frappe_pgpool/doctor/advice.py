"""What `bench pgpool doctor --apply` sets: db_pool_process_clients, the opt-in client budget of the sites
pooled in pgBouncer transaction mode.

Opting in keeps a pgBouncer client per site in every process, and about one idle PostgreSQL backend per
site served lately in pgBouncer's pools: safe only where pgBouncer's settings bound those servers within
PostgreSQL's max_connections, which a worker cannot read (it has no admin console). doctor can: so the
value is the largest (every such site's client kept, halved while only a client cap refuses it) whose
worst case every check accepts, checked by examine() on the bench as it would be with it; where none is,
the key stays unset (plain Frappe's peak, the default). No I/O of its own: examine() reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ..pool.config import PROCESS_BUDGET_MAX, PROCESS_CLIENTS_KEY
from .checks import ADMIN_FIX, examine
from .model import Bench, Connect, Finding
from .wording import _names

# the checks a smaller client budget can satisfy: clients, not servers (a pool keeps the servers it
# needed at once whatever number of clients each process keeps)
CLIENT_CAPS = frozenset({"max_client_conn", "max_db_client_connections", "max_user_client_connections"})


@dataclass(frozen=True)
class ClientsAdvice:
	"""db_pool_process_clients to set (`value`), or None: leave it unset, with why (`reason`, `fix`) and
	the errors that refused the last value tried (`refused`)."""

	value: int | None
	reason: str
	fix: str = ""
	refused: tuple[Finding, ...] = ()
	accepted: tuple[Finding, ...] = ()  # the trial's findings on clients and servers, when it fits


def advise_process_clients(
	bench: Bench,
	bouncers: Mapping[str, Connect] | None,
	postgres: Connect | None = None,
	timeout: float = 10.0,
) -> ClientsAdvice:
	"""The largest db_pool_process_clients whose worst case fits every pgBouncer and PostgreSQL server
	of the bench, or None (with why)."""
	tx = [s for s in bench.sites if s.transaction_pooled]
	if not tx:
		return ClientsAdvice(
			None,
			"no pooled site is in pgBouncer transaction mode (db_pool_pgbouncer_mode): "
			f"{PROCESS_CLIENTS_KEY} does not apply",
		)
	unseen = [s for s in tx if s.address not in (bouncers or {})]
	if unseen:
		return ClientsAdvice(
			None,
			f"{_names(unseen)}: no pgBouncer admin console examined in front of them, so the servers their "
			"pools would keep cannot be counted",
			ADMIN_FIX,
		)
	floor = max(1, bench.threads)  # a process keeps its peak of checkouts anyway
	value = max(floor, min(PROCESS_BUDGET_MAX, len(tx)))  # a client of every such site in every process
	best: ClientsAdvice | None = None  # the largest value that fits so far
	above = None  # the smallest value a client cap refused
	while True:
		trial = dataclasses.replace(
			bench, sites=tuple(dataclasses.replace(s, process_clients=value) for s in bench.sites)
		)
		findings = examine(trial, bouncers, postgres, timeout)
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
		else:  # the servers (or anything else) refuse it: fewer clients per process would not help
			return ClientsAdvice(
				None,
				f"{_names(tx)}: with {PROCESS_CLIENTS_KEY}={value} doctor finds "
				+ "; ".join(f"{f.check}: {f.message}" for f in refused),
				"; ".join(dict.fromkeys(f.fix for f in refused if f.fix)),
				refused,
			)
		if above is None or (best is not None and above - best.value <= 1):
			return best  # type: ignore[return-value]  # above is None only once a value fit
		# halve until a value fits, then bisect between it and the smallest refused
		value = max(floor, above // 2) if best is None else (best.value + above) // 2
