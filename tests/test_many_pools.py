"""Many pools in one process: every site and every password rotation adds one.

The registry drops a pool that holds nothing and has not been used for a while (its max_idle, at
least UNUSED_POOL_SECONDS, on the registry's clock, which these tests drive), and keeps its counters
in the process totals; what a process publishes per round is bounded whatever its number of pools.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from frappe_pgpool import observe, publish
from frappe_pgpool.pool import PoolConfig, PoolKey, PoolRegistry
from frappe_pgpool.pool.registry import UNUSED_POOL_SECONDS

from .conftest import USERS, frappe_like_factory, key_for


class Clock:
	"""time.monotonic(), moved ahead when a test says so (waits and timeouts still see real time pass)."""

	def __init__(self) -> None:
		self.ahead = 0.0

	def __call__(self) -> float:
		return time.monotonic() + self.ahead


@pytest.fixture
def clock():
	return Clock()


@pytest.fixture
def reg(clock):
	registry = PoolRegistry(reap_interval=0, clock=clock)
	registry.set_process_budget(50)  # room for every pool's idle connection: no eviction between them
	yield registry
	registry.close_all()


def total_checkouts(items: list[dict]) -> int:
	return sum(pool["checkouts"] for report in items for pool in report["pools"])


def test_an_empty_unused_pool_is_dropped_and_its_counters_stay_in_the_totals(bouncer, reg, clock):
	config = PoolConfig(enabled=True, size=2, max_idle=5)
	connect = frappe_like_factory(bouncer)
	used, never, busy = (
		key_for(bouncer=bouncer, site=s) for s in ("used.local", "never.local", "busy.local")
	)
	reg.putconn(reg.getconn(used, config, connect))
	reg.pool(never, config)  # created, never checked out from
	held = reg.getconn(busy, config, connect)
	first = reg.pools()[used]

	reg.maintain()
	assert set(reg.pools()) == {used, never, busy}  # just used or just made: nothing dropped
	clock.ahead += UNUSED_POOL_SECONDS - 1
	reg.maintain()  # past max_idle: the idle connection is closed, but the pool was used too lately
	assert set(reg.pools()) == {used, never, busy}
	assert first.snapshot()["closed"] == {"idle": 1}
	clock.ahead += 2
	reg.maintain()
	assert set(reg.pools()) == {busy}  # in use: kept, whatever its age
	assert (
		not reg.holds_site("used.local")
		and not reg.holds_site("never.local")
		and reg.holds_site("busy.local")
	)
	assert reg.snapshot()["pools"] == 1  # nor in the budget
	dropped = reg.dropped()
	assert (dropped["pools"], dropped["checkouts"], dropped["created"], dropped["closed"]) == (
		2,
		1,
		1,
		{"idle": 1},
	)

	# a later checkout gets a fresh pool
	reg.putconn(reg.getconn(used, config, connect))
	second = reg.pools()[used]
	assert second is not first and second.snapshot()["checkouts"] == 1
	with pytest.raises(Exception, match="closed"):
		first.getconn(connect)
	# the process totals still count the dropped pool's checkout: 1 dropped + 1 fresh + 1 busy
	items = observe.reports(reg, detail=observe.DETAIL_POOLS, seen={})
	assert total_checkouts(items) == 3
	(other,) = [r for r in items if r["site"] == observe.OTHER]
	assert other["pools"][0]["dropped"] == 2 and other["pools"][0]["pools"] == 0
	reg.putconn(held)


def test_a_pool_that_keeps_its_idle_connection_is_not_dropped(bouncer, reg, clock):
	config = PoolConfig(enabled=True, size=2, max_idle=0, max_lifetime=0)  # idle and kept for good
	key = key_for(bouncer=bouncer, site="keeps.local")
	reg.putconn(reg.getconn(key, config, frappe_like_factory(bouncer)))
	reg.maintain()
	clock.ahead += 10 * UNUSED_POOL_SECONDS
	reg.maintain()
	assert set(reg.pools()) == {key} and reg.pools()[key].snapshot()["idle"] == 1


def test_checkouts_racing_with_drops_always_get_a_connection_and_every_checkout_is_counted(
	bouncer, reg, clock
):
	config = PoolConfig(enabled=True, size=2, max_idle=1)
	connect = frappe_like_factory(bouncer)
	keys = [key_for(bouncer=bouncer, site=f"race{i}.local") for i in range(16)]
	done = [0] * 8
	errors: list[BaseException] = []
	stop = threading.Event()

	def worker(n: int) -> None:
		try:
			for i in range(120):
				reg.putconn(reg.getconn(keys[(n * 7 + i * 5) % len(keys)], config, connect))
				done[n] += 1
		except BaseException as e:
			errors.append(e)

	def dropper() -> None:
		while not stop.is_set():
			clock.ahead += UNUSED_POOL_SECONDS + 1  # every round: every pool holding nothing is old
			reg.maintain()

	threads = [threading.Thread(target=worker, args=(n,)) for n in range(len(done))]
	reaper = threading.Thread(target=dropper)
	interval = sys.getswitchinterval()
	# threads switch between almost any two bytecodes: a drop lands between a lookup and its checkout
	sys.setswitchinterval(1e-6)
	try:
		reaper.start()
		for t in threads:
			t.start()
		for t in threads:
			t.join()
	finally:
		sys.setswitchinterval(interval)
		stop.set()
		reaper.join()
	assert errors == []
	assert reg.dropped()["pools"] > 0  # the race was run, not avoided
	items = observe.reports(reg, detail=observe.DETAIL_POOLS, seen={})
	assert total_checkouts(items) == sum(done) == 8 * 120


def test_what_a_process_publishes_per_round_is_bounded_with_1000_pools(bouncer, reg):
	connect = frappe_like_factory(bouncer)
	config = PoolConfig(enabled=True, size=2)
	keys = [
		PoolKey.make(f"site{i:04}.local", "127.0.0.1", bouncer.port, "app1", "app1", USERS["app1"])
		for i in range(1000)
	]
	for key in keys:
		reg.pool(key, config)  # through the real API: created lazily, holding no connection
	held = reg.getconn(keys[500], config, connect)  # a connection open
	for _ in range(5):
		reg.putconn(reg.getconn(keys[900], config, connect))  # the busiest lately
	reg.putconn(reg.getconn(keys[7], config, connect))

	publisher = publish.Publisher(reg)
	payload = publisher.payload()
	items = [json.loads(value) for value in payload.values()]
	rows = [pool for report in items for pool in report["pools"]]
	print(f"\n1000 pools: {len(payload)} keys, {len(rows)} rows, {sum(map(len, payload.values()))} bytes")
	assert len(rows) == observe.DETAIL_POOLS + 1
	assert len(payload) <= observe.DETAIL_POOLS + 1
	# each key one site's report (or the aggregate), each row at most a few KiB
	assert sum(map(len, payload.values())) < (observe.DETAIL_POOLS + 1) * 4096
	sites = {report["site"] for report in items}
	assert {"site0500.local", "site0900.local", "site0007.local", observe.OTHER} <= sites
	(other,) = [r["pools"][0] for r in items if r["site"] == observe.OTHER]
	assert (other["pools"], other["dropped"]) == (1000 - observe.DETAIL_POOLS, 0)
	# nothing is lost from the process totals
	assert sum(row["checkouts"] for row in rows) == 7 and sum(row["in_use"] for row in rows) == 1
	assert sum(row["max_size"] for row in rows) == 2000
	assert all(
		key.startswith(publish.PREFIX) and key.endswith(f":{report['pid']}")
		for key, report in zip(payload, items, strict=True)
	)

	# what `bench pgpool status` does with it: the table, --json, --prometheus
	table = observe.render_table(items)
	assert "total: 3/2000 connections, 1 in use, 2 idle, 0 waiting; 7 checkouts, 3 created" in table
	assert len(table.splitlines()) == len(rows) + 2
	observe.with_rates(items)
	text = observe.render_prometheus(items)
	assert f'site="{observe.OTHER}"' in text
	reg.putconn(held)
