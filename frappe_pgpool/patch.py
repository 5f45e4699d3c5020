"""install()/uninstall() of the wrappers around Frappe's connection open and close.

Idempotent and order-independent, in the manner of ddtrace's patch()/unpatch(): installing
twice wraps once; uninstalling restores the original attribute when our wrapper is the
outermost one, and otherwise turns it into a pass-through (someone wrapped on top of us).
"""

from __future__ import annotations

import threading

import wrapt

from . import frappe_layer

_lock = threading.Lock()

# (module path, class name or None for the module itself, attribute) -> the wrapper we put there
_TARGETS = (
	("psycopg2", None, "connect", frappe_layer.psycopg2_connect),
	("frappe.database.postgres.database", "PostgresDatabase", "get_connection", frappe_layer.get_connection),
	("frappe.database.database", "Database", "close", frappe_layer.close),
	("frappe.database.database", "Database", "sql", frappe_layer.sql),
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


def install() -> bool:
	"""Wrap the methods; True if anything was (re)enabled."""
	changed = False
	with _lock:
		for module_name, class_name, attr, wrapper in _TARGETS:
			cls = _find(module_name, class_name)
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
	changed = False
	with _lock:
		for module_name, class_name, attr, wrapper in _TARGETS:
			cls = _find(module_name, class_name)
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
	for module_name, class_name, attr, wrapper in _TARGETS:
		existing = _our_wrapper(_find(module_name, class_name), attr, wrapper)
		if existing is None or not existing._self_enabled():
			return False
	return True


class _Flag:
	"""wrapt's `enabled` callable: when False the wrapper calls straight through."""

	def __init__(self) -> None:
		self.value = True

	def __call__(self) -> bool:
		return self.value
