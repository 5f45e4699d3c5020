"""Whether, and how, this process is armed: written by `bootstrap` (which arms), read by the reports
(`observe`, `arming`).

A leaf: it imports nothing of the app, so the arming and the reporting both import it without a loop.
Imported at interpreter start with `bootstrap`, so it imports only `sys` (not even __future__).
"""

import sys

POSTGRES_MODULE = "frappe.database.postgres.database"  # the wrappers are installed when it has loaded

# "start": armed before Frappe's PostgreSQL module was loaded; "hook": after it (set once, by bootstrap.arm)
how = None


def armed() -> str:
	"""How this process got the patch: "start", "hook" (late: earlier connections went unpooled) or "no"."""
	if how is None:
		return "no"
	if POSTGRES_MODULE not in sys.modules:
		return how  # nothing to wrap yet, and so no connection opened yet either
	patch = sys.modules.get("frappe_pgpool.patch")  # not imported here: a process that never wrapped
	return how if patch is not None and patch.is_installed() else "no"
