"""What a benchmark ran on, as one line for the top of its report, read when it runs (nothing hard-coded).

    from benchmarks.provenance import provenance
    line = provenance(postgres=cluster.connect, pgbouncer=bouncer.admin, bench=BENCH)

frappe_pgpool's commit (and "with uncommitted changes" when frappe_pgpool/ differs from it) and version,
Frappe's version from the bench's own frappe package, Python and psycopg2 (the bench's env when a bench
serves the requests, else this interpreter's), PostgreSQL's `SELECT version()` on the server used,
pgBouncer's `SHOW VERSION` on its admin console, CPUs and architecture, load average, UTC date and the
exact command line. benchmarks/check_results.py reads the commit back from "frappe_pgpool <hash>".
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "Ran on:"  # how the line starts in every report

# run by the bench's Python: what its workers import
_BENCH_PROBE = """
import json, os, sys
import frappe, psycopg2, frappe_pgpool
print(json.dumps({"frappe": frappe.__version__, "psycopg2": psycopg2.__version__.split()[0],
    "python": sys.version.split()[0], "frappe_pgpool": frappe_pgpool.__version__,
    "frappe_pgpool_dir": os.path.dirname(os.path.dirname(os.path.realpath(frappe_pgpool.__file__)))}))
"""


def _git(repo: Path, *args: str) -> str:
	result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
	return result.stdout.strip() if result.returncode == 0 else ""


def code_version(repo: Path = ROOT) -> str:
	"""Short commit of `repo`, plus "with uncommitted changes" when its frappe_pgpool/ differs from it."""
	commit = _git(repo, "rev-parse", "--short", "HEAD") or "unknown commit"
	dirty = _git(repo, "status", "--porcelain", "--", "frappe_pgpool")
	return commit + (" with uncommitted changes" if dirty else "")


def _bench_versions(bench: str) -> dict:
	python = Path(bench, "env", "bin", "python")
	result = subprocess.run(
		[str(python), "-c", _BENCH_PROBE],
		capture_output=True,
		text=True,
		cwd=Path(bench, "sites"),
		timeout=120,
	)
	lines = result.stdout.strip().splitlines()
	if result.returncode or not lines:
		return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
	return json.loads(lines[-1])


def _postgres_version(connect: Callable[[], object]) -> str:
	try:
		with contextlib.closing(connect()) as conn, conn.cursor() as cur:  # type: ignore[attr-defined]
			cur.execute("SELECT version()")
			full = cur.fetchone()[0]
	except Exception as e:  # a report still gets written; it says why the version is missing
		return f"PostgreSQL ? ({type(e).__name__})"
	return full.split(" on ", 1)[0]  # "PostgreSQL 15.20 (Debian 15.20-0+deb12u1)", without the compiler


def pgbouncer_version(admin: Callable[[str], list[dict]]) -> str:
	"""SHOW VERSION on a pgBouncer's admin console ("PgBouncer 1.18.0")."""
	try:
		rows = admin("SHOW VERSION")
	except Exception as e:
		return f"pgBouncer ? ({type(e).__name__})"
	return str(next(iter(rows[0].values()))) if rows else "pgBouncer ?"


def load_average() -> str:
	"""The 1/5/15-minute load averages, e.g. "3.12 2.40 1.95"."""
	return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line() -> str:
	script = Path(sys.argv[0]).resolve()
	with contextlib.suppress(ValueError):
		script = script.relative_to(ROOT)
	return shlex.join(["python", str(script), *sys.argv[1:]])


def provenance(
	*,
	postgres: Callable[[], object] | None = None,
	pgbouncer: Callable[[str], list[dict]] | str | None = None,
	bench: str | None = None,
) -> str:
	"""One line naming what this run measures and on what.

	postgres: opens a connection to the server used (SELECT version()); pgbouncer: its admin() (SHOW
	VERSION), or a version already read; bench: a Frappe bench whose env serves the requests.
	"""
	import psycopg2

	import frappe_pgpool

	parts = []
	found = _bench_versions(bench) if bench else {}
	app_dir = Path(found.get("frappe_pgpool_dir") or ROOT)
	if bench and app_dir.resolve() != ROOT.resolve():  # the bench runs another checkout than this one
		version = found.get("frappe_pgpool", "?")
		parts.append(
			f"frappe_pgpool {code_version(app_dir)} (version {version}, the bench's copy at {app_dir})"
		)
	else:
		version = found.get("frappe_pgpool", frappe_pgpool.__version__)
		parts.append(f"frappe_pgpool {code_version()} (version {version})")
	if bench:
		if "error" in found:
			parts.append(f"Frappe ? (bench {bench}: {found['error']})")
		else:
			parts.append(f"Frappe {found['frappe']}")
	runner = sys.version.split()[0]
	if found.get("python") and found["python"] != runner:
		parts.append(f"Python {found['python']} (bench; {runner} runs the benchmark)")
	else:
		parts.append(f"Python {runner}")
	parts.append(f"psycopg2 {found.get('psycopg2') or psycopg2.__version__.split()[0]}")
	if postgres is not None:
		parts.append(_postgres_version(postgres))
	if pgbouncer is not None:
		parts.append(pgbouncer if isinstance(pgbouncer, str) else pgbouncer_version(pgbouncer))
	parts.append(f"{platform.machine()}, {os.cpu_count()} CPUs, load {load_average()}")
	parts.append(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
	return f"{PREFIX} " + "; ".join(parts) + f". `{command_line()}`"


if __name__ == "__main__":  # what this machine would write now (no server, no bench)
	print(provenance(bench=os.environ.get("FRAPPE_BENCH_PATH") or None))
