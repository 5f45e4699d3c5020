"""A forked child never uses, closes or terminates a connection its parent opened."""

from __future__ import annotations

import gc
import os

import pytest

from .conftest import backend_pid, frappe_like_factory, key_for, scalar


def run_in_child(body) -> int:
	pid = os.fork()
	if pid == 0:  # pragma: no cover - child
		code = 1
		try:
			code = body()
		finally:
			os._exit(code)
	_, status = os.waitpid(pid, 0)
	return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("parent_holds", [False, True], ids=["idle-in-pool", "checked-out"])
def test_child_gets_its_own_connections_and_parent_keeps_its_own(bouncer, registry, config, parent_holds):
	connect = frappe_like_factory(bouncer)
	key = key_for(bouncer=bouncer, site="fork")
	conn = registry.getconn(key, config, connect)
	parent_pid = backend_pid(conn)
	if not parent_holds:
		registry.putconn(conn)
	inherited = conn

	def child() -> int:
		# the parent's pools are gone in the child
		if registry.pools():
			return 10
		mine = registry.getconn(key, config, connect)
		if backend_pid(mine) == parent_pid:
			return 11
		registry.putconn(mine)
		# returning or closing the inherited object must not reach the parent's session
		if registry.putconn(inherited):
			return 12
		inherited.close()
		gc.collect()
		return 0

	assert run_in_child(child) == 0
	if not parent_holds:
		conn = registry.getconn(key, config, connect)
	# the parent's session is intact: same backend, usable, no error
	assert backend_pid(conn) == parent_pid
	assert scalar(conn, "SELECT 1") == 1
	registry.putconn(conn)
	assert registry.pool(key, config).snapshot()["created"] == 1


def test_child_that_never_touches_the_pool_does_not_harm_the_parent(bouncer, registry, config):
	connect = frappe_like_factory(bouncer)
	key = key_for(bouncer=bouncer, site="fork2")
	conn = registry.getconn(key, config, connect)
	pid = backend_pid(conn)
	registry.putconn(conn)
	# a child that cleans up (close_all, garbage collection) must not send Terminate

	def child() -> int:
		registry.close_all()
		gc.collect()
		return 0

	assert run_in_child(child) == 0
	conn = registry.getconn(key, config, connect)
	assert backend_pid(conn) == pid and scalar(conn, "SELECT 1") == 1
	registry.putconn(conn)


def test_the_child_runs_its_own_reaper(bouncer, registry):
	from frappe_pgpool.pool import PoolConfig

	config = PoolConfig(size=1, max_idle=0.5)
	key = key_for(bouncer=bouncer, site="fork-reaper")
	registry.putconn(registry.getconn(key, config, frappe_like_factory(bouncer)))
	parent_reaper = registry._reaper
	assert parent_reaper is not None and parent_reaper.is_alive()
	pid = os.fork()
	if pid == 0:  # pragma: no cover - child
		code = 0
		try:
			registry.putconn(registry.getconn(key, config, frappe_like_factory(bouncer)))
			reaper = registry._reaper
			if reaper is None or reaper is parent_reaper or not reaper.is_alive():
				code = 3
			else:
				import time

				# the child's own reaper closes the idle connection: polled as a state (a hang detector
				# at 60 s), not a sleep that guesses when the reaper has run
				deadline = time.monotonic() + 60
				while registry.pool(key, config).snapshot()["closed"].get("idle") != 1:
					if time.monotonic() > deadline:
						code = 4
						break
					time.sleep(0.01)
		except BaseException:
			code = 5
		os._exit(code)
	_, status = os.waitpid(pid, 0)
	assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("how", ["replaced", "site-closed"])
def test_a_child_never_terminates_a_connection_held_from_a_pool_the_parent_dropped(bouncer, registry, how):
	"""A checkout outlives its pool: the pool made again under another budget (its pgBouncer mode changed)
	or closed with its site. The child must disown that connection too (before: only the registry's live
	pools were, so the child's close sent a Terminate on the parent's socket and ended its session)."""
	from frappe_pgpool.pool import PoolConfig

	connect = frappe_like_factory(bouncer)
	key = key_for(bouncer=bouncer, site=f"fork-{how}")
	held = registry.getconn(key, PoolConfig(size=2), connect)
	parent_pid = backend_pid(held)
	if how == "replaced":
		registry.set_process_clients(4)  # a client budget, so the transaction-mode config moves the pool
		registry.putconn(registry.getconn(key, PoolConfig(size=2, pgbouncer_mode="transaction"), connect))
	else:
		registry.close_site(key.site)
	assert registry.pools().get(key) is None or registry.pools()[key].config.pgbouncer_mode == "transaction"

	def child() -> int:
		held.close()
		gc.collect()
		return 0

	assert run_in_child(child) == 0
	assert backend_pid(held) == parent_pid and scalar(held, "SELECT 1") == 1
	assert registry.putconn(held)  # closed on return: its pool is gone
