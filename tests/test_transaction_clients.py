"""Many sites behind pgBouncer in transaction mode: with db_pool_process_clients set (opt-in), a kept
connection is a client, budgeted as one.

On a real pgBouncer in transaction mode (SCRAM), one process serving 20 sites in turn (a sync worker's
round robin) keeps a client per site: after the first round every checkout is a hit and pgBouncer sees no
new login. Pools of sites in session mode (or straight to PostgreSQL), in the same process, still keep
no more than the process's peak of checkouts (db_pool_process_budget auto), as plain Frappe would have
had open. Unset ("auto"), transaction-mode pools share db_pool_process_budget like the others: kept
clients leave their servers idle in pgBouncer, one per site served lately, which only pgBouncer's
settings bound (doctor checks them), so keeping more than plain Frappe's peak is the operator's choice.
"""

from __future__ import annotations

import logging
import time

import psycopg2
import psycopg2.extensions as ext
import pytest

from frappe_pgpool.pool import ConfigError, PoolConfig, PoolRegistry, parse_config
from frappe_pgpool.pool.config import PROCESS_CLIENTS_OFF, parse_process_clients
from frappe_pgpool.testing.cluster import PgBouncer

from .conftest import USERS, backend_pid, key_for

SITES = 20
TX = PoolConfig(enabled=True, size=8, timeout=2, pgbouncer_mode="transaction")
SESSION = PoolConfig(enabled=True, size=8, timeout=2)
CLIENTS = 100  # db_pool_process_clients as the README suggests it


class Clock:
	"""time.monotonic(), moved ahead when a test says so."""

	def __init__(self) -> None:
		self.ahead = 0.0

	def __call__(self) -> float:
		return time.monotonic() + self.ahead


@pytest.fixture(scope="module")
def tx_bouncer(cluster):
	with PgBouncer(cluster, users=USERS, pool_mode="transaction", default_pool_size=4) as b:
		yield b


@pytest.fixture
def clock():
	return Clock()


@pytest.fixture
def plain_reg(clock):
	"""A registry as it starts: db_pool_process_clients unset."""
	registry = PoolRegistry(reap_interval=0, clock=clock)
	yield registry
	registry.close_all()


@pytest.fixture
def reg(plain_reg):
	"""A registry with the client budget switched on (db_pool_process_clients: 100)."""
	plain_reg.set_process_clients(CLIENTS)
	return plain_reg


def factory(bouncer: PgBouncer, user: str = "app1"):
	def connect() -> ext.connection:
		conn = psycopg2.connect(bouncer.dsn(user, USERS[user], user))
		conn.set_isolation_level(ext.ISOLATION_LEVEL_REPEATABLE_READ)
		return conn

	return connect


def keys(bouncer: PgBouncer, prefix: str, n: int = SITES) -> list:
	return [key_for("app1", f"{prefix}{i:02d}.local", bouncer) for i in range(n)]


def rounds(reg: PoolRegistry, sites: list, config: PoolConfig, connect, n: int) -> None:
	"""n round robins over the sites, one checkout at a time, each a request's transaction left open."""
	for _ in range(n):
		for key in sites:
			conn = reg.getconn(key, config, connect)
			backend_pid(conn)
			reg.putconn(conn)


def totals(reg: PoolRegistry, sites: list) -> dict:
	pools = reg.pools()
	snaps = [pools[k].snapshot() for k in sites if k in pools]
	return {
		"hits": sum(s["hits"] for s in snaps),
		"misses": sum(s["misses"] for s in snaps),
		"evictions": sum(sum(s["evictions"].values()) for s in snaps),
		"closed": sum(sum(s["closed"].values()) for s in snaps),
	}


def test_twenty_sites_in_transaction_mode_keep_a_client_each_with_no_new_login(tx_bouncer, reg):
	sites = keys(tx_bouncer, "tx")
	connect = factory(tx_bouncer)
	rounds(reg, sites, TX, connect, 1)  # warm-up: one login per site
	logins, before = tx_bouncer.logins("app1"), totals(reg, sites)
	rounds(reg, sites, TX, connect, 5)
	after = totals(reg, sites)
	assert tx_bouncer.logins("app1") == logins  # no new pgBouncer login after the warm-up
	assert after["hits"] - before["hits"] == 5 * SITES  # every checkout a hit
	assert (after["misses"], after["evictions"], after["closed"]) == (
		before["misses"],
		before["evictions"],
		before["closed"],
	)
	clients = reg.snapshot()["clients"]
	assert (clients["process_clients"], clients["limit"], clients["open"], clients["idle"]) == (
		CLIENTS,
		CLIENTS,
		SITES,
		SITES,
	)
	assert clients["peak"] == 1 and clients["keeping"]
	# what pgBouncer sees: one client per site, idle, and no server held between requests
	ours = [c for c in tx_bouncer.clients() if c["database"] == "app1" and c["user"] == "app1"]
	assert len(ours) >= SITES
	pools = [p for p in tx_bouncer.admin("SHOW POOLS") if p["database"] == "app1"]
	assert sum(int(p["sv_active"]) for p in pools) == 0


def test_session_mode_pools_in_the_same_process_still_keep_no_more_than_the_peak(bouncer, tx_bouncer, reg):
	"""The two budgets side by side: the transaction-mode sites keep a client each, the session-mode
	sites (each kept connection a server) no more than the one plain Frappe would have had open."""
	tx_sites, session_sites = keys(tx_bouncer, "txs"), keys(bouncer, "ses")
	tx_connect, session_connect = factory(tx_bouncer), factory(bouncer)
	for _ in range(3):
		for tx_key, session_key in zip(tx_sites, session_sites, strict=True):
			for key, config, connect in ((tx_key, TX, tx_connect), (session_key, SESSION, session_connect)):
				conn = reg.getconn(key, config, connect)
				backend_pid(conn)
				reg.putconn(conn)
	snap = reg.snapshot()
	assert (snap["process_budget"], snap["peak"], snap["limit"]) == ("auto", 1, 1)
	assert snap["open"] - snap["clients"]["open"] <= 1  # the peak rule: one at a time, as plain Frappe
	assert snap["clients"]["open"] == SITES  # a client per transaction-mode site
	assert totals(reg, session_sites)["hits"] == 0
	assert totals(reg, tx_sites)["hits"] == 2 * SITES


def test_a_pool_whose_mode_changes_is_made_again_under_the_other_budget(tx_bouncer, reg):
	key = keys(tx_bouncer, "switch", 1)[0]
	connect = factory(tx_bouncer)
	held = reg.getconn(key, SESSION, connect)
	old = reg.pools()[key]
	conn = reg.getconn(key, TX, connect)  # the site now says transaction: a fresh pool, client budget
	new = reg.pools()[key]
	assert new is not old and old._closed
	assert new._budget is reg.budget_of(TX) and old._budget is reg.budget_of(SESSION)
	assert reg.putconn(held)  # the old pool's connection closes on return, kept by neither budget
	assert reg.snapshot()["open"] == 1  # the new pool's, in use
	reg.putconn(conn)
	assert reg.snapshot()["clients"]["open"] == reg.snapshot()["open"] == 1  # the totals hold both budgets
	assert reg.dropped()["pools"] == 1


def test_lowering_db_pool_process_clients_closes_idle_clients_above_it(tx_bouncer, reg):
	sites = keys(tx_bouncer, "low", 6)
	rounds(reg, sites, TX, factory(tx_bouncer), 1)
	assert reg.snapshot()["clients"]["open"] == 6
	reg.set_process_clients(2)
	assert (reg.snapshot()["clients"]["open"], reg.snapshot()["clients"]["limit"]) == (2, 2)
	reg.set_process_clients("auto")  # off: what the client budget keeps idle is closed now
	assert reg.snapshot()["open"] == reg.snapshot()["clients"]["open"] == 0
	assert reg.pools()[sites[-1]].snapshot()["closed"] == {"reconfigured": 1}  # one of the 2 kept
	rounds(reg, sites, TX, factory(tx_bouncer), 1)  # and the pools move to db_pool_process_budget
	assert all(p._budget is reg.budget_of(SESSION) for p in reg.pools().values())
	assert reg.snapshot()["open"] <= reg.snapshot()["peak"] == 1


def test_by_default_transaction_mode_pools_keep_no_more_than_the_peak(tx_bouncer, plain_reg):
	"""db_pool_process_clients unset: the 20 sites share db_pool_process_budget (auto: the peak, one here),
	so a round robin keeps nothing (each checkout logs in and ends as plain Frappe's: pgBouncer drops its
	server), and no client of a site served earlier stays open."""
	reg = plain_reg
	sites = keys(tx_bouncer, "dflt")
	connect = factory(tx_bouncer)
	rounds(reg, sites, TX, connect, 1)
	logins = tx_bouncer.logins("app1")
	rounds(reg, sites, TX, connect, 2)
	snap = reg.snapshot()
	assert "clients" not in snap and reg.budget_of(TX) is reg.budget_of(SESSION)
	assert (snap["process_budget"], snap["peak"], snap["limit"]) == ("auto", 1, 1)
	assert snap["open"] <= 1
	assert tx_bouncer.logins("app1") - logins >= 2 * SITES - 1  # plain Frappe's: a login per request


def test_switching_the_client_budget_on_moves_transaction_mode_pools_to_it(tx_bouncer, plain_reg):
	reg = plain_reg
	sites = keys(tx_bouncer, "on", 4)
	connect = factory(tx_bouncer)
	rounds(reg, sites, TX, connect, 1)
	assert all(p._budget is reg.budget_of(SESSION) for p in reg.pools().values())
	rounds(reg, sites, TX, connect, 1)  # the value comes with each checkout, as a site config gives it
	for key in sites:
		reg.putconn(reg.getconn(key, TX, connect, process_clients=CLIENTS))
	assert all(p._budget is reg.budget_of(TX) is not reg.budget_of(SESSION) for p in reg.pools().values())
	assert reg.snapshot()["clients"]["open"] == 4


def test_a_quiet_sites_kept_client_still_goes_after_max_idle(tx_bouncer, reg, clock):
	config = PoolConfig(enabled=True, size=8, timeout=2, max_idle=30, pgbouncer_mode="transaction")
	sites = keys(tx_bouncer, "quiet", 3)
	rounds(reg, sites, config, factory(tx_bouncer), 1)
	assert reg.snapshot()["clients"]["open"] == 3
	clock.ahead += 31
	reg.maintain()
	assert reg.snapshot()["clients"]["open"] == 0


@pytest.mark.parametrize(
	("value", "expected"),
	[(None, PROCESS_CLIENTS_OFF), ("auto", PROCESS_CLIENTS_OFF), (5, 5), ("7", 7)],
)
def test_process_clients_values(value, expected):
	assert parse_process_clients(value) == expected


@pytest.mark.parametrize("value", [0, -1, 1001, "many", True, 2.5])
def test_a_bad_process_clients_value_raises_naming_the_key(value):
	with pytest.raises(ConfigError, match="db_pool_process_clients"):
		parse_process_clients(value)
	with pytest.raises(ConfigError, match="db_pool_process_clients"):
		parse_config({"db_pool_enabled": 1, "db_pool_process_clients": value})


def test_a_bad_process_clients_value_given_to_the_registry_is_logged_once_and_auto_applies(
	tx_bouncer, reg, caplog
):
	key = keys(tx_bouncer, "bad", 1)[0]
	with caplog.at_level(logging.ERROR, logger="frappe_pgpool"):
		for _ in range(3):
			reg.putconn(reg.getconn(key, TX, factory(tx_bouncer), process_clients="lots"))
	assert sum("db_pool_process_clients" in r.getMessage() for r in caplog.records) == 1
	assert "clients" not in reg.snapshot() and reg.budget_of(TX) is reg.budget_of(SESSION)  # auto: off


def test_a_site_first_seen_after_the_gate_shut_can_open_it_again(tx_bouncer, reg):
	"""Traffic spread over 12 sites with 2 kept clients shuts the reuse gate. A site first seen then, and
	busy from then on, must be able to reopen it: its closed returns count as returns (before: only kept
	ones did, so its checkouts never counted and it missed all 30)."""
	reg.set_process_clients(2)
	connect = factory(tx_bouncer)
	rounds(reg, keys(tx_bouncer, "spread", 12), TX, connect, 3)
	assert not reg.snapshot()["clients"]["keeping"]
	(hot,) = keys(tx_bouncer, "late-hot", 1)
	rounds(reg, [hot], TX, connect, 30)
	assert reg.pools()[hot].snapshot()["hits"] >= 20


def test_switching_the_client_budget_off_and_on_again_starts_its_gate_afresh(tx_bouncer, reg):
	"""The pools made again under the switched-on budget are new: the gate's window from before (another
	rule's) is dropped, so one busy site keeps its client again (before, with the gate counting only pools
	that had kept a connection: 0 hits in 40)."""
	connect = factory(tx_bouncer)
	rounds(reg, keys(tx_bouncer, "flip", 12), TX, connect, 2)
	reg.set_process_clients("auto")
	reg.set_process_clients(CLIENTS)
	(busy,) = keys(tx_bouncer, "flip-busy", 1)
	rounds(reg, [busy], TX, connect, 40)
	assert reg.pools()[busy].snapshot()["hits"] >= 30
