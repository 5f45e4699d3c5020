"""A pooled connection's record: the physical connection and its bookkeeping.

No Frappe import. Its own module, below both the pool that holds records (pool.py) and the budget that
picks one to evict and hands it to a waiter (budget.py), so that neither imports the other for it.
"""

from __future__ import annotations

import select
from dataclasses import dataclass

import psycopg2.extensions as ext

from .connection import SessionDefaults, close_ending_server


@dataclass(eq=False)
class Record:
	"""One physical connection and its bookkeeping (SQLAlchemy's _ConnectionRecord)."""

	conn: ext.connection
	# None: opened while keeping did not pay (see budget.REUSE_MIN_RATE), or over db_pool_size; it is closed
	# on return as plain Frappe closes it, so nothing a reset would need is recorded (the miss costs no more).
	defaults: SessionDefaults | None
	poller: select.poll | None
	created_at: float
	expires_at: float
	returned_at: float = 0.0
	checked_out_at: float = 0.0
	checkout_stack: str | None = None
	leak_reported: bool = False
	thread: int = 0  # ident of the thread whose checkout holds it (the budget counts per thread)
	over_size: bool = False  # opened while its pool kept db_pool_size connections: not kept (defaults None)
	retire: str | None = None  # set by mark(): closed on return for this reason instead of reset

	def end(self, _conn: ext.connection | None = None) -> None:
		"""Close it as plain Frappe's connection ends: a kept connection takes its server with it, in session
		mode the one it pins, in transaction mode the idle one its last return gave back to pgBouncer."""
		close_ending_server(self.conn, self.defaults is not None)
