"""Arms the patch so it is in place before a process opens its first database connection.

`arm()` only registers a post-import hook (no Frappe import): the wrappers are installed the
moment `frappe.database.postgres.database` is imported, or at once if it already is. It is
called from the app's `__init__` and from `frappe_pgpool_autoload.pth`, which `after_install` puts in
the bench's site-packages so that every Python process of the bench (gunicorn with or
without --preload, RQ workers and work-horses, the scheduler, bench execute) arms it at start,
before Frappe is even imported: hooks are cached in Redis and run too late for that.
"""

from __future__ import annotations

import os
import sys
import sysconfig

import wrapt

POSTGRES_MODULE = "frappe.database.postgres.database"
# sorts after an editable install's own "frappe_pgpool.pth", which puts the app on sys.path
PTH_NAME = "frappe_pgpool_autoload.pth"
# One line, executed by site.py at interpreter start; silent if the app was removed.
PTH_LINE = (
	"import importlib.util as _u; "
	"_u.find_spec('frappe_pgpool') and __import__('frappe_pgpool.bootstrap').bootstrap.arm()\n"
)

_armed = False


def arm() -> None:
	global _armed
	if _armed or os.environ.get("FRAPPE_PGPOOL_DISABLE_PATCH") == "1":
		return
	_armed = True
	wrapt.register_post_import_hook(_on_postgres_module, POSTGRES_MODULE)


def _on_postgres_module(module: object) -> None:
	from .patch import install

	install()


def pth_path() -> str:
	return os.path.join(
		sysconfig.get_paths(vars={"base": sys.prefix, "platbase": sys.prefix})["purelib"], PTH_NAME
	)


def write_pth() -> str | None:
	"""Put the .pth in this interpreter's site-packages (the bench venv); None if not writable."""
	path = pth_path()
	try:
		with open(path, "w") as f:
			f.write(PTH_LINE)
	except OSError:
		return None
	return path


def remove_pth() -> bool:
	try:
		os.remove(pth_path())
	except FileNotFoundError:
		return False
	return True
