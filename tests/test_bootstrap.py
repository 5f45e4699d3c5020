"""Arming ships with the package: a wheel or an editable install, by pip or uv, arms every interpreter.

Each test makes a fresh venv (no Frappe needed), installs this working tree into it the way a
Dockerfile or `bench get-app` does, and looks at what a plain `python -c` of that venv has loaded:
the package's .pth must have registered the import trigger, and nothing heavier than the two small
modules of frappe_pgpool may have been imported for it (no wrapt, asyncio, importlib.metadata).
Uninstalling must leave nothing of the app in site-packages.

The import trigger itself (bootstrap._Trigger) is exercised on a module made for the test, since its
job is generic: run a callback once a named module has been executed, whoever imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PTH = "frappe_pgpool_arm.pth"


def _uv() -> str | None:
	beside = Path(sys.executable).parent / "uv"  # the test extras install it into the venv
	found = str(beside) if beside.exists() else shutil.which("uv")
	bench = os.environ.get("FRAPPE_BENCH_PATH")
	if not found and bench and Path(bench, ".bench-cli", "bin", "uv").exists():
		found = str(Path(bench, ".bench-cli", "bin", "uv"))
	return found


UV = _uv()


def run(*args: str, **kw) -> subprocess.CompletedProcess:
	result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
	assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
	return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
	out = tmp_path_factory.mktemp("wheel")
	run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT))
	(built,) = out.glob("frappe_pgpool-*.whl")
	return built


def fresh_venv(path: Path) -> Path:
	run(sys.executable, "-m", "venv", "--without-pip", str(path))
	return path / "bin" / "python"


def site_packages(python: Path) -> Path:
	return Path(
		run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
	)


PROBE = """
import json, sys
print(json.dumps({
	"modules": sorted(sys.modules),
	"finders": [type(f).__module__ + "." + type(f).__qualname__ for f in sys.meta_path],
}))
"""


def probe(python: Path) -> dict:
	return json.loads(run(str(python), "-c", PROBE, cwd="/").stdout)


def install(python: Path, installer: str, target: str, editable: bool) -> None:
	spec = ["-e", target] if editable else [target]
	if installer == "pip":
		run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", *spec)
	else:
		run(UV, "pip", "install", "-q", "--no-deps", "--python", str(python), *spec)


def uninstall(python: Path, installer: str) -> None:
	if installer == "pip":  # what `bench remove-app` runs without uv
		run(sys.executable, "-m", "pip", "--python", str(python), "uninstall", "-y", "-q", "frappe_pgpool")
	else:  # what `bench remove-app` runs with uv
		run(UV, "pip", "uninstall", "-q", "--python", str(python), "frappe_pgpool")


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
@pytest.mark.parametrize("installer", ["pip", "uv"])
def test_the_package_install_arms_every_interpreter_importing_only_bootstrap_and_uninstall_leaves_nothing(
	tmp_path, wheel, installer, editable
):
	if installer == "uv" and UV is None:
		pytest.skip("no uv on PATH nor in FRAPPE_BENCH_PATH/.bench-cli/bin")
	python = fresh_venv(tmp_path / "venv")
	sp = site_packages(python)
	before = probe(python)

	install(python, installer, str(ROOT) if editable else str(wheel), editable)

	assert (sp / PTH).is_file(), sorted(p.name for p in sp.iterdir())
	record = next(sp.glob("frappe_pgpool-*.dist-info")) / "RECORD"
	assert PTH in {line.split(",")[0] for line in record.read_text().splitlines()}  # so uninstall removes it
	after = probe(python)
	# site.py itself decodes .pth files with the utf-8-sig codec since Python 3.13: any .pth loads it
	# What a start costs is what it imports: the package's __init__ and bootstrap (which imports only os,
	# sys and _thread, loaded at any start), nothing else: no wrapt (it once cost ~90 ms a start), psycopg2,
	# Frappe, asyncio or importlib.metadata. The time itself is a figure: benchmarks/startup.py.
	new_modules = {m for m in set(after["modules"]) - set(before["modules"]) if m != "encodings.utf_8_sig"}
	assert new_modules == {"frappe_pgpool", "frappe_pgpool.bootstrap", "frappe_pgpool.armed_state"}, (
		new_modules
	)
	assert after["finders"][0] == "frappe_pgpool.bootstrap._Trigger", after["finders"]

	uninstall(python, installer)
	# (pip removes the then empty site-packages of this pip-less venv altogether)
	left = [p.name for p in sp.iterdir() if "frappe_pgpool" in p.name.lower()] if sp.exists() else []
	assert left == []
	assert not {m for m in probe(python)["modules"] if m.startswith("frappe_pgpool")}


def test_importing_the_package_arms_nothing_only_the_pth_and_the_hooks_do():
	"""Without the .pth (PYTHONPATH entries run no .pth file), importing the engine, doctor or the package
	leaves sys.meta_path alone: arming is the .pth's job at start, and arming.py's hooks' as a fallback."""
	paths = os.pathsep.join([str(ROOT), *(p for p in sys.path if p.endswith("site-packages"))])
	code = (
		"import sys; before = list(sys.meta_path); "
		"import frappe_pgpool, frappe_pgpool.pool, frappe_pgpool.doctor, frappe_pgpool.observe; "
		"untouched = sys.meta_path == before; "
		"from frappe_pgpool import bootstrap; bootstrap.arm(); "
		"print(untouched, type(sys.meta_path[0]).__qualname__, bootstrap.armed())"
	)
	env = {k: v for k, v in os.environ.items() if k != "FRAPPE_PGPOOL_DISABLE_PATCH"} | {"PYTHONPATH": paths}
	result = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True)
	assert result.returncode == 0, result.stderr
	# untouched by the imports; arm() then puts its trigger first, before Frappe's module loads: "start"
	assert result.stdout.split() == ["True", "_Trigger", "start"]


def test_the_wheel_keeps_the_frappe_app_files(wheel):
	import zipfile

	names = set(zipfile.ZipFile(wheel).namelist())
	for name in ("hooks.py", "modules.txt", "patches.txt", "__init__.py", "frappe_pgpool/__init__.py"):
		assert f"frappe_pgpool/{name}" in names, name
	assert PTH in names
	assert not [n for n in names if n.endswith(".pth") and n != PTH]  # no copy inside the package
	meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
	from frappe_pgpool import __version__

	assert f"Version: {__version__}" in zipfile.ZipFile(wheel).read(meta).decode()


# -- the import trigger --------------------------------------------------------------------------

TRIGGER = """
import json, sys, threading, importlib
sys.path.insert(0, {tmp!r})
from frappe_pgpool import bootstrap
fired = []
def callback(module):
	fired.append((module.__name__, module.READY, type(module.__loader__).__name__, threading.get_ident()))
	{extra}
sys.meta_path.insert(0, bootstrap._Trigger("pkg.target", callback))
{body}
print("@@" + json.dumps(dict(fired=fired, **result)))
"""


def trigger(tmp_path: Path, body: str, extra: str = "pass") -> dict:
	pkg = tmp_path / "pkg"
	pkg.mkdir(exist_ok=True)
	(pkg / "__init__.py").write_text("")
	(pkg / "target.py").write_text("import time\ntime.sleep(0.05)\nREADY = True\n")
	(pkg / "other.py").write_text("READY = True\n")
	code = TRIGGER.format(tmp=str(tmp_path), body=textwrap.dedent(body), extra=extra)
	out = run(sys.executable, "-c", code, env={**os.environ, "FRAPPE_PGPOOL_DISABLE_PATCH": "1"}).stdout
	return json.loads(out.split("@@", 1)[1])


def test_the_trigger_runs_once_after_the_module_body_and_leaves_no_trace(tmp_path):
	result = trigger(
		tmp_path,
		"""
		import pkg.other, pkg.target
		import pkg.target as again
		import importlib.util
		result = dict(
			loader=type(pkg.target.__loader__).__name__,
			spec_loader=type(pkg.target.__spec__.loader).__name__,
			source=bool(importlib.util.find_spec("pkg.target").loader.get_source("pkg.target")),
		)
		""",
	)
	assert [f[:3] for f in result["fired"]] == [["pkg.target", True, "SourceFileLoader"]]
	assert result["loader"] == result["spec_loader"] == "SourceFileLoader"
	assert result["source"]


def test_a_failing_callback_is_logged_and_the_import_still_succeeds(tmp_path):
	result = trigger(
		tmp_path,
		"""
		import logging, io
		stream = io.StringIO()
		logging.getLogger("frappe_pgpool").addHandler(logging.StreamHandler(stream))
		import pkg.target
		result = dict(ready=pkg.target.READY, log=stream.getvalue())
		""",
		extra="raise RuntimeError('boom')",
	)
	assert result["ready"] is True
	assert "pkg.target" in result["log"] and "boom" in result["log"]


def test_concurrent_imports_fire_once(tmp_path):
	result = trigger(
		tmp_path,
		"""
		barrier = threading.Barrier(8)
		def worker():
			barrier.wait()
			importlib.import_module("pkg.target")
		threads = [threading.Thread(target=worker) for _ in range(8)]
		[t.start() for t in threads]
		[t.join() for t in threads]
		result = {}
		""",
	)
	assert len(result["fired"]) == 1
