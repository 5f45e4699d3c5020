"""Whitelisted endpoints (System Manager only): what this worker process's pool is doing."""

from __future__ import annotations

import os

import frappe

from .patch import is_installed
from .pool import registry


@frappe.whitelist()
def status() -> dict:
	"""This process's pools for the current site, and which server session serves this request."""
	frappe.only_for("System Manager")
	site = frappe.local.site
	backend_pid, current_user, current_database = frappe.db.sql(
		"select pg_backend_pid(), current_user, current_database()"
	)[0]
	return {
		"site": site,
		"process_id": os.getpid(),
		"backend_pid": backend_pid,
		"current_user": current_user,
		"current_database": current_database,
		"patch_installed": is_installed(),
		"pools": [pool.snapshot() for key, pool in registry.pools().items() if key.site == site],
	}
