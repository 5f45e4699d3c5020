"""Run code inside a real Frappe bench's Python (FRAPPE_BENCH_PATH), as Frappe itself would.

The tests in this folder need a bench with frappe_pgpool installed in its env and a site on
PostgreSQL; they are skipped, with the reason, when there is none:

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local pytest tests/frappe
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

BENCH = os.environ.get("FRAPPE_BENCH_PATH", "")
SITE = os.environ.get("FRAPPE_SITE", "")
RESULT_MARK = "@@RESULT@@"

PRELUDE = f"""
import json, os, sys
def out(obj):
    print({RESULT_MARK!r} + json.dumps(obj, default=str), flush=True)
SITE = os.environ["FRAPPE_SITE"]
"""


def bench_problem() -> str | None:
	"""Why the Frappe tests cannot run here, or None."""
	if not BENCH:
		return "no Frappe bench: set FRAPPE_BENCH_PATH (and FRAPPE_SITE, a site on PostgreSQL) to run these"
	python = Path(BENCH, "env", "bin", "python")
	if not python.exists():
		return f"FRAPPE_BENCH_PATH={BENCH} has no env/bin/python"
	if not SITE or not Path(BENCH, "sites", SITE, "site_config.json").exists():
		return f"FRAPPE_SITE={SITE!r} is not a site of the bench at {BENCH}"
	probe = subprocess.run(
		[str(python), "-c", "import frappe_pgpool, frappe"], capture_output=True, text=True
	)
	if probe.returncode:
		return (
			f"frappe_pgpool is not installed in {BENCH}/env (bench get-app it): {probe.stderr.strip()[-300:]}"
		)
	return None


requires_bench = pytest.mark.skipif(bench_problem() is not None, reason=bench_problem() or "")


def run_in_bench(
	code: str, *, site: str | None = None, timeout: float = 300, env: dict | None = None
) -> list:
	"""Run `code` with the bench's Python in sites/; return every value it passed to out()."""
	with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
		f.write(PRELUDE + textwrap.dedent(code))
	try:
		result = subprocess.run(
			[str(Path(BENCH, "env", "bin", "python")), f.name],
			cwd=Path(BENCH, "sites"),
			capture_output=True,
			text=True,
			timeout=timeout,
			env={**os.environ, "FRAPPE_SITE": site or SITE, **(env or {})},
		)
	finally:
		os.unlink(f.name)
	if result.returncode:
		raise AssertionError(
			f"bench script failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
		)
	return [
		json.loads(line[len(RESULT_MARK) :])
		for line in result.stdout.splitlines()
		if line.startswith(RESULT_MARK)
	]


def bench_cli(*args: str, site: str | None = SITE, timeout: float = 600) -> subprocess.CompletedProcess:
	"""`bench [--site SITE] ARGS` as the bench CLI runs it (frappe.utils.bench_helper), output captured."""
	site_args = ["--site", site] if site else []
	return subprocess.run(
		[
			str(Path(BENCH, "env", "bin", "python")),
			"-m",
			"frappe.utils.bench_helper",
			"frappe",
			*site_args,
			*args,
		],
		cwd=Path(BENCH, "sites"),
		capture_output=True,
		text=True,
		timeout=timeout,
	)
