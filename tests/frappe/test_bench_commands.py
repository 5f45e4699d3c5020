"""bench commands on the real bench: install-app / uninstall-app, and bench execute's teardown."""

from __future__ import annotations

import os

import pytest

from .bench import SITE, bench_cli, requires_bench
from .e2e import read_site_config, sites_behind_pgbouncer

pytestmark = [pytest.mark.frappe, requires_bench]
SITE2 = os.environ.get("FRAPPE_SITE2", "")


def bench(*args: str, site: str) -> str:
	"""`bench --site SITE ARGS`, as the bench CLI runs it; fails the test on a non-zero exit."""
	result = bench_cli(*args, site=site)
	assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
	return result.stdout


@pytest.mark.skipif(not SITE2, reason="FRAPPE_SITE2 not set: install/uninstall runs on the second site")
def test_uninstall_then_install_app_switches_the_site_off_and_on():
	assert read_site_config(SITE2).get("db_pool_enabled") == 1
	try:
		bench("uninstall-app", "frappe_pgpool", "--yes", "--no-backup", "--force", site=SITE2)
		assert "db_pool_enabled" not in read_site_config(SITE2)
		assert "frappe_pgpool" not in bench("list-apps", site=SITE2)
	finally:
		out = bench("install-app", "frappe_pgpool", site=SITE2)
	assert "pool enabled for" in out
	assert read_site_config(SITE2).get("db_pool_enabled") == 1


def test_bench_execute_ends_its_connection_as_plain_frappe_does():
	db = read_site_config(SITE)["db_name"]
	with sites_behind_pgbouncer([SITE]) as (bouncer, _upstream):
		opened = []
		for enabled in (0, 0, 1, 1, 1):
			config_args = ["set-config", "db_pool_enabled", str(enabled), "--parse"]
			bench(*config_args, site=SITE)
			before = bouncer.server_connections_opened(db)
			bench("execute", "frappe.db.get_value", "--args", '["User", "Administrator", "name"]', site=SITE)
			opened.append(bouncer.server_connections_opened(db) - before)
		bench("set-config", "db_pool_enabled", "1", "--parse", site=SITE)
	# plain: the connection is closed inside a transaction, so pgBouncer drops its server connection
	# and the next run needs a new backend; pooled: destroy() returns it and the process's exit ends it as
	# plain Frappe's ends (issue 23, item 3): pgBouncer drops that server too, no idle backend is left
	# behind by a process that is gone
	print(f"\nnew Postgres backends per bench execute, plain x2 then pooled x3: {opened}")
	assert opened == [1, 1, 1, 1, 1]
