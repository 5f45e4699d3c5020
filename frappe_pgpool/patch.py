"""install()/uninstall() of the wrappers around Frappe's connection open and close (and its database setup).

Idempotent and order-independent, in the manner of ddtrace's patch()/unpatch(): installing
twice wraps once; uninstalling restores the original attribute when our wrapper is the
outermost one, and otherwise turns it into a pass-through (someone wrapped on top of us).
Only Frappe 15 and 16 are patched; any other major logs once and is left alone (served unpooled).
"""

from __future__ import annotations

import logging
import os
import threading

import wrapt

from . import frappe_layer, site_lifecycle

log = logging.getLogger("frappe_pgpool")
SUPPORTED_MAJORS = (15, 16)

_lock = threading.Lock()
# install()/uninstall() import Frappe's modules before taking _lock; that import runs the import
# trigger (bootstrap), which calls install() again in the same thread: it must return at once.
_resolving = threading.local()
_unsupported: str | None = None  # the Frappe version refused, once logged


def _after_fork_in_child() -> None:
	# a work-horse armed in before_job installs the wrappers: _lock may have been held by a parent
	# thread at fork time (frappe_layer lists the Frappe layer's locks)
	global _lock
	_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)

# (module path, class name or None for the module itself, attribute) -> the wrapper we put there
_TARGETS = (
	("psycopg2", None, "connect", frappe_layer.psycopg2_connect),
	("frappe.database.postgres.database", "PostgresDatabase", "get_connection", frappe_layer.get_connection),
	("frappe.database.database", "Database", "close", frappe_layer.close),
	("frappe.database.database", "Database", "sql", frappe_layer.sql),
	# reinstall, restore, new-site --force: end the sessions pools keep before the DROP DATABASE. Frappe's
	# dispatcher, not postgres.setup_db's function: frappe.database is loaded already, and setup_db (with
	# db_manager, ~1 ms) stays unimported in every process that never sets up a database (a work horse)
	("frappe.database", None, "setup_database", site_lifecycle.setup_database),
)


def _find(module_name: str, class_name: str | None):
	import importlib

	module = importlib.import_module(module_name)
	return module if class_name is None else getattr(module, class_name)


def _our_wrapper(cls: object, attr: str, wrapper) -> wrapt.FunctionWrapper | None:
	"""Our FunctionWrapper on cls.attr, outermost or anywhere down the chain."""
	current = cls.__dict__.get(attr)
	while current is not None:
		if isinstance(current, wrapt.FunctionWrapper) and current._self_wrapper is wrapper:
			return current
		current = getattr(current, "__wrapped__", None)
	return None


def _resolve() -> list | None:
	"""[(class or module, attribute, wrapper)], importing what is needed; None when re-entered."""
	if getattr(_resolving, "active", False):
		return None
	_resolving.active = True
	try:
		return [(_find(m, c), attr, wrapper) for m, c, attr, wrapper in _TARGETS]
	finally:
		_resolving.active = False


def supported() -> bool:
	"""True on Frappe 15 and 16; otherwise logs once (per process) and returns False."""
	global _unsupported
	import frappe

	version = str(getattr(frappe, "__version__", "?"))
	try:
		major = int(version.split(".")[0])
	except ValueError:
		major = None
	if major in SUPPORTED_MAJORS:
		return True
	if _unsupported != version:
		_unsupported = version
		log.error(
			"frappe_pgpool: Frappe %s is not supported (only %s are); the patch is not installed "
			"and every site of this process is served unpooled",
			version,
			" and ".join(str(m) for m in SUPPORTED_MAJORS),
		)
	return False


def install() -> bool:
	"""Wrap the methods; True if anything was (re)enabled."""
	targets = _resolve()
	if targets is None or not supported():
		return False
	changed = False
	with _lock:
		for cls, attr, wrapper in targets:
			existing = _our_wrapper(cls, attr, wrapper)
			if existing is not None:
				if not existing._self_enabled():
					existing._self_enabled.value = True
					changed = True
				continue
			wrapt.wrap_object(cls, attr, wrapt.FunctionWrapper, (wrapper, _Flag()))
			changed = True
	return changed


def uninstall() -> bool:
	"""Restore the originals; True if anything was removed or disabled."""
	targets = _resolve()
	if targets is None:
		return False
	changed = False
	with _lock:
		for cls, attr, wrapper in targets:
			existing = _our_wrapper(cls, attr, wrapper)
			if existing is None:
				continue
			if cls.__dict__.get(attr) is existing:
				setattr(cls, attr, existing.__wrapped__)
			else:
				existing._self_enabled.value = False  # wrapped over by someone else
			changed = True
	return changed


def is_installed() -> bool:
	"""True when every wrapper is in place and enabled; imports nothing."""
	import sys

	for module_name, class_name, attr, wrapper in _TARGETS:
		module = sys.modules.get(module_name)
		cls = module if class_name is None or module is None else getattr(module, class_name, None)
		existing = _our_wrapper(cls, attr, wrapper) if cls is not None else None
		if existing is None or not existing._self_enabled():
			return False
	return True


class _Flag:
	"""wrapt's `enabled` callable: when False the wrapper calls straight through."""

	def __init__(self) -> None:
		self.value = True

	def __call__(self) -> bool:
		return self.value
