"""Errors raised by the pool.

They subclass psycopg2.OperationalError so that code which already handles a
failed database connection (Frappe included) handles a pool failure the same way.
"""

from __future__ import annotations

import psycopg2


class PoolError(psycopg2.OperationalError):
	"""Base class of every error the pool raises itself."""


class PoolTimeout(PoolError):
	"""No connection became free within the configured wait."""


class PoolClosed(PoolError):
	"""The pool was closed (site disabled, process exiting) while a caller used it."""


class ConfigError(ValueError):
	"""A pool setting has a wrong type or range. Carries the key and the rejected value."""

	def __init__(self, key: str, value: object, expected: str, show_value: bool = True) -> None:
		self.key = key
		self.value = value
		self.expected = expected
		# an unknown key's value is not shown: a misplaced DSN or password would be echoed into the logs
		shown = f"{key}={value!r}" if show_value else key
		super().__init__(f"frappe_pgpool: invalid {shown} in site config: expected {expected}")
