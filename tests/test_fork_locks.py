"""A fork while another thread holds one of the Frappe layer's module locks leaves the child able to take it.

Frappe 15's RQ worker runs a scheduler thread that reads site config (site_pool_config, under
frappe_layer._config_lock) while its main thread forks a work-horse per job; a work-horse that was not
armed at start arms in before_job (bootstrap.arm, then patch.install). fork() copies a held lock as
held, and the thread that would release it does not exist in the child: without a fresh lock the job
would hang at its first config-cache miss. Each case runs in its own interpreter: a thread takes the
lock and keeps it, the main thread forks, the child does what a work-horse does with it and exits 0.
A child that hangs is killed at a generous bound and the case fails (the bound guards the run; no
time is asserted).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import os, sys, threading, time
from frappe_pgpool import bootstrap, frappe_layer, patch

lock = {lock}
held, release = threading.Event(), threading.Event()

def holder():
	with lock:
		held.set()
		release.wait()

threading.Thread(target=holder, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
	try:
		{child}
		code = 0
	except BaseException as e:
		print("child:", repr(e), flush=True)
		code = 3
	os._exit(code)
deadline = time.monotonic() + {bound}
while True:
	done, status = os.waitpid(pid, os.WNOHANG)
	if done:
		print("child exit", os.waitstatus_to_exitcode(status), flush=True)
		break
	if time.monotonic() > deadline:
		os.kill(pid, 9)
		os.waitpid(pid, 0)
		print("child hung", flush=True)
		break
	time.sleep(0.02)
release.set()
"""

CASES = {
	# a config-cache miss: a site conf this process has not seen yet takes the lock to store it
	"config": (
		"frappe_layer._config_lock",
		"assert frappe_layer.site_pool_config('new.site', {'db_pool_enabled': 1, 'db_pool_size': 3}).size == 3",
	),
	# arm() takes bootstrap's lock before it looks whether the process is armed already
	"bootstrap": ("bootstrap._lock", "bootstrap.arm()"),
	# install()/uninstall() take it once Frappe's classes are resolved; that needs Frappe, so the child
	# takes the lock as they would (install itself is covered on a bench by tests/frappe/test_patch.py)
	"patch": ("patch._lock", "assert patch._lock.acquire(timeout=30)"),
	# a new redis_cache URL (a work-horse's first checkout after a fork) takes the publisher's lock
	"publisher": (
		"frappe_layer.publisher._lock",
		"frappe_layer.publisher.configure('redis://127.0.0.1:1/0')",
	),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_lock_held_by_another_thread_at_fork_time_is_free_in_the_child(case):
	lock, child = CASES[case]
	code = SCRIPT.format(lock=lock, child=child, bound=60)
	env = {k: v for k, v in os.environ.items() if k != "FRAPPE_PGPOOL_DISABLE_PATCH"}
	result = subprocess.run(
		[sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env, cwd="/"
	)
	assert result.returncode == 0, result.stderr[-3000:]
	assert result.stdout.strip().splitlines()[-1] == "child exit 0", result.stdout + result.stderr[-3000:]
