"""The bench as doctor sees it: its sites, its processes and the findings, and what the processes can hold
at once (demand, the process budgets). Knows no I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..pool import ConfigError, PoolConfig
from ..pool.config import parse_process_clients

Connect = Callable[[], Any]


@dataclass(frozen=True)
class Site:
	"""A PostgreSQL site of the bench, as its processes connect to it."""

	name: str
	dbname: str
	user: str
	config: PoolConfig  # enabled=False: plain Frappe, one connection per request in flight
	address: str = ""  # host:port its processes connect to (see `address`): a pgBouncer or PostgreSQL
	connect: Connect | None = field(default=None, compare=False, repr=False)  # with its own credentials
	# db_pool_process_budget as its processes apply it: "auto", a whole number, or None for a
	# frappe_pgpool without one (each pool then keeps up to min(threads, db_pool_size) on its own, and opens
	# up to threads at once)
	process_budget: object = None
	# db_pool_process_clients as its processes apply it ("auto": off, a whole number), or None for a
	# frappe_pgpool without it; off, its transaction-mode pools share db_pool_process_budget
	process_clients: object = None

	@property
	def pooled(self) -> bool:
		return bool(self.config.enabled)

	@property
	def client_budgeted(self) -> bool:
		"""Pooled in transaction mode under the client budget (db_pool_process_clients set): kept
		connections are pgBouncer clients, a client per site."""
		return self.transaction_pooled and _clients_floor(self.process_clients) > 0

	@property
	def transaction_pooled(self) -> bool:
		return self.pooled and self.config.pgbouncer_mode == "transaction"


def _clients_floor(value: object) -> int:
	"""db_pool_process_clients as a process applies it: 0 (off) for "auto", unset or a bad value (the
	process logs it and applies auto)."""
	if value is None:
		return 0
	try:
		return parse_process_clients(value)
	except ConfigError:
		return 0


@dataclass(frozen=True)
class Bench:
	"""The sites of a bench and its processes, each of which may connect to every site."""

	sites: tuple[Site, ...]
	web: int  # gunicorn worker processes
	threads: int = 1  # threads per gunicorn worker
	jobs: int = 1  # RQ work-horses and the scheduler: one job, so one connection in use, at a time each

	def __post_init__(self) -> None:
		object.__setattr__(self, "sites", tuple(self.sites))


@dataclass(frozen=True)
class Finding:
	level: str  # "ok", "warn" or "error"
	check: str
	message: str
	fix: str = ""


# --- what the bench's processes can hold ---


def _budget_value(value: object, concurrency: int) -> int | None:
	if isinstance(value, str):
		word = value.strip().lower()
		if word == "auto":
			return concurrency
		if word in ("", "0", "off", "none"):
			return None
	if value is None or isinstance(value, bool):
		return None
	try:
		number = int(value)
	except (TypeError, ValueError):
		return None
	return number if number > 0 else None


def process_budget(sites: Iterable[Site], concurrency: int, override: object = None) -> int | None:
	"""Most connections a process with `concurrency` threads keeps open across all sites, or None.

	db_pool_process_budget: "auto" is the process's peak of concurrent checkouts, so at most its thread
	count (1 for a sync worker or an RQ work-horse); a number is that number. The process applies the
	value of the site it serves: with different values on different sites the largest counts (an upper
	bound); a site without one (None) means no budget.
	"""
	values = [override] if override is not None else [s.process_budget for s in sites if s.pooled]
	limits = [_budget_value(v, concurrency) for v in values]
	if not limits or None in limits:
		return None
	return max(limits)


def process_clients(sites: Iterable[Site], concurrency: int) -> int | None:
	"""Most clients a process with `concurrency` threads keeps open across its client-budgeted sites, or
	None where none is: db_pool_process_clients, or its peak of checkouts if higher; the largest of the
	sites' values (a process applies the value of the site it serves)."""
	limits = [_clients_floor(s.process_clients) for s in sites if s.client_budgeted]
	return max(concurrency, *limits) if limits else None


@dataclass(frozen=True)
class Demand:
	"""Connections the bench's processes can hold at once for some of its sites."""

	bench: Bench
	web: int  # one web process
	job: int  # one job process

	@property
	def total(self) -> int:
		return self.bench.web * self.web + self.bench.jobs * self.job

	@property
	def text(self) -> str:
		return f"{self.bench.web} web x {self.web} + {self.bench.jobs} job x {self.job} = {self.total}"


def demand(bench: Bench, sites: Sequence[Site], budget: object = None, active: bool = False) -> Demand:
	"""What every process of the bench can hold at once for `sites` (each process may serve each site).

	A process keeps up to min(threads, db_pool_size) connections per pooled site, at most its budget
	across all sites; a plain Frappe site costs one connection per request in flight. Where threads exceed
	a site's db_pool_size, the requests beyond it open connections they close at their end (not kept): at
	worst all of a process's threads on the site that keeps fewest, beside what the others keep. `active`:
	only connections inside a transaction (what pgBouncer's transaction mode gives a server to), one per
	thread.
	"""
	held = []
	for concurrency in (bench.threads, 1):
		pooled = [s for s in sites if s.pooled]
		sizes = [min(concurrency, s.config.size) for s in pooled]
		# beyond a site's db_pool_size a process opens connections it does not keep: at worst all its threads
		# on the site that keeps fewest, beside what the others keep
		over = concurrency - min(sizes) if sizes else 0
		# transaction-mode sites under the client budget (db_pool_process_clients) and the others
		count = sum(min(concurrency, s.config.size) for s in pooled if not s.client_budgeted) + over
		kept = sum(min(concurrency, s.config.size) for s in pooled if s.client_budgeted)
		plain = concurrency if len(pooled) < len(sites) else 0
		if active:
			count = min(concurrency, count + kept + plain)
		else:
			limit = process_budget(bench.sites, concurrency, budget)
			clients = process_clients(bench.sites, concurrency)
			count = (count if limit is None else min(count, limit)) + plain
			count += kept if clients is None else min(kept, clients)
		held.append(count)
	return Demand(bench, *held)


def _group(sites: Iterable[Site], key: Callable[[Site], Any]) -> dict[Any, list[Site]]:
	groups: dict[Any, list[Site]] = {}
	for s in sites:
		groups.setdefault(key(s), []).append(s)
	return groups


def _pool_key(s: Site) -> tuple[str, str]:
	return (s.dbname, s.user)
