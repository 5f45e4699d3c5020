"""Arms the patch in every Python process of the environment, before Frappe opens a connection.

The package ships `frappe_pgpool_arm.pth` at the top of its wheel (and of its editable wheel), so
pip, uv and `bench get-app` put it in site-packages with the app and remove it with the app. Python
runs its one line at interpreter start: `import frappe_pgpool.bootstrap` and `arm(pth=True)` (the
package's `__init__` arms nothing: importing the engine or doctor has no side effect).
`arm()` only puts `_Trigger`, a small finder, first on `sys.meta_path`: the wrappers are installed
the moment `frappe.database.postgres.database` has been executed, whoever imports it. Nothing else
is imported until then (no wrapt, no Frappe), so the other interpreters of the venv (pip, bench's
own helpers, scripts) pay well under a millisecond for it.

A process that imports the app after Frappe's PostgreSQL module (a request or job hook, the
fallback in `arming.py`) is armed late: `armed()` tells which, for the published process report.
This module imports nothing beyond `os`, `sys` and the leaf `armed_state` (where the record of how the
process was armed lives, for the reports) at start (not even __future__); keep it that way.
"""

import _thread
import os
import sys

from . import armed_state
from .armed_state import POSTGRES_MODULE
from .armed_state import armed as armed  # re-exported: tests and older callers read bootstrap.armed()

PTH_NAME = "frappe_pgpool_arm.pth"  # shipped by the package: pyproject.toml, force-include
LEGACY_PTH_NAME = "frappe_pgpool_autoload.pth"  # what install-app wrote up to 0.1.0; removed on sight
DISABLE_ENV = "FRAPPE_PGPOOL_DISABLE_PATCH"

_lock = _thread.allocate_lock()
_pth_ran = False


def _after_fork_in_child() -> None:
	# arm() runs in a forked work-horse too (arming.before_job): _lock may have been held by a parent
	# thread at fork time, and the thread that would release it is not in the child
	global _lock
	_lock = _thread.allocate_lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def arm(*, pth: bool = False) -> None:
	"""Install the wrappers when Frappe's PostgreSQL module loads, or now if it already has."""
	global _pth_ran
	if pth:
		_pth_ran = True
	if os.environ.get(DISABLE_ENV) == "1":
		return
	with _lock:
		if armed_state.how is not None:
			return
		loaded = sys.modules.get(POSTGRES_MODULE)
		armed_state.how = "hook" if loaded is not None else "start"
		trigger = _Trigger(POSTGRES_MODULE, _install)
		sys.meta_path.insert(0, trigger)  # a later load (a re-import) gets wrapped too
	if loaded is not None:
		trigger.fire(loaded)


def why_not_at_start() -> str:
	"""Why this process was not armed at interpreter start, in words for a log line."""
	if os.environ.get(DISABLE_ENV) == "1":
		return f"{DISABLE_ENV}=1 is set in its environment"
	places = site_dirs()
	if not any(os.path.exists(os.path.join(d, PTH_NAME)) for d in places):
		return (
			f"{PTH_NAME} is not in {' or '.join(places) or 'its site-packages'}, so this Python "
			"environment did not get frappe_pgpool from a package install; install the app into the "
			"environment that runs the processes (bench get-app / bench setup requirements, or pip "
			"install in the image) so that every process is armed at start"
		)
	if not _pth_ran:
		return (
			f"{PTH_NAME} is in its site-packages but did not run at interpreter start (python -S, or its "
			"line failed: see the process's stderr at start)"
		)
	return "frappe_pgpool was imported only after Frappe's PostgreSQL module"


def site_dirs() -> list[str]:
	"""The directories whose .pth files this interpreter ran at start."""
	import site  # already imported at start, unless python -S

	dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
	if site.ENABLE_USER_SITE:
		dirs.append(site.getusersitepackages())
	return [d for d in dirs if os.path.isdir(d)]


def remove_legacy_pth() -> list[str]:
	"""Delete the .pth that install-app wrote into site-packages up to 0.1.0; the paths removed.

	It was not part of the package, so pip or uv uninstall (bench remove-app) left it behind. It
	would be harmless (its line checks that the app exists) but it imports the app at every start
	a second way, and with an older app version, wrapt too.
	"""
	removed = []
	for d in site_dirs():
		path = os.path.join(d, LEGACY_PTH_NAME)
		try:
			os.remove(path)
		except FileNotFoundError:
			continue
		except OSError:  # read-only site-packages: nothing to do about it here
			continue
		removed.append(path)
	return removed


def shipped_pth() -> str | None:
	"""Where the package's own .pth is in this interpreter's site dirs, or None."""
	for d in site_dirs():
		path = os.path.join(d, PTH_NAME)
		if os.path.exists(path):
			return path
	return None


def _install(module: object) -> None:
	from .patch import install

	install()


class _Trigger:
	"""A meta path finder that runs `callback(module)` each time module `name` has been executed.

	It answers only for that one name: it finds the module's spec through the finders after it and
	wraps the loader, so the callback runs right after the module body, inside the same import
	(other threads importing it wait for it, as for any import). Every other import costs one
	string comparison. After the load the module's `__loader__` and `__spec__.loader` are the
	original ones again, so inspect, linecache and reload see nothing of this.
	"""

	def __init__(self, name: str, callback) -> None:
		self.name = name
		self.callback = callback

	def find_spec(self, fullname: str, path=None, target=None):
		if fullname != self.name:
			return None
		for finder in sys.meta_path:
			find_spec = getattr(finder, "find_spec", None)
			if finder is self or isinstance(finder, _Trigger) or find_spec is None:
				continue
			spec = find_spec(fullname, path, target)
			if spec is not None:
				break
		else:
			return None
		if spec.loader is None or not hasattr(spec.loader, "exec_module"):
			return spec
		spec.loader = _Loader(spec.loader, self)
		return spec

	def invalidate_caches(self) -> None:
		pass

	def fire(self, module: object) -> None:
		try:
			self.callback(module)
		except Exception:
			import logging

			logging.getLogger("frappe_pgpool").exception(
				"frappe_pgpool: could not install the patch when %s was imported; this process is not pooled",
				self.name,
			)


class _Loader:
	def __init__(self, loader, trigger: _Trigger) -> None:
		self.loader = loader
		self.trigger = trigger

	def create_module(self, spec):
		return self.loader.create_module(spec)

	def exec_module(self, module) -> None:
		module.__loader__ = self.loader
		if getattr(module, "__spec__", None) is not None:
			module.__spec__.loader = self.loader
		self.loader.exec_module(module)
		self.trigger.fire(module)

	def __getattr__(self, name: str):
		return getattr(self.loader, name)
