"""Whitelisted endpoints, System Manager only: the pools of this site, as JSON or Prometheus text."""

from __future__ import annotations

import os

import frappe

from . import __version__, observe, publish
from .patch import is_installed
from .pool import registry
from .pool.connection import keepalive_options

# the libpq options the pool may add to a connection (frappe_layer.connect_options): none of them a secret
_POOL_OPTIONS = frozenset(("connect_timeout", *keepalive_options()))


@frappe.whitelist()
def status() -> dict:
	"""This process's pools for the current site, and which server session serves this request."""
	frappe.only_for("System Manager")
	site = frappe.local.site
	backend_pid, current_user, current_database, application_name = frappe.db.sql(
		"select pg_backend_pid(), current_user, current_database(), current_setting('application_name')"
	)[0]
	conn = frappe.db._conn
	return {
		"site": site,
		"version": __version__,
		"process_id": os.getpid(),
		"backend_pid": backend_pid,
		"current_user": current_user,
		"current_database": current_database,
		"application_name": application_name,
		# the pool's libpq options on this request's connection
		"connection_options": {k: v for k, v in conn.get_dsn_parameters().items() if k in _POOL_OPTIONS},
		"patch_installed": is_installed(),
		# this process's budget ({"budget", "open", "peak"}) and "armed", where this version has them
		**observe.process_fields(registry),
		"pools": [p for r in observe.with_rates(observe.reports(registry, site)) for p in r["pools"]],
		# what `bench --site S pgpool status --json` prints
		"processes": observe.with_rates(_processes(site)),
	}


@frappe.whitelist(methods=["GET"])
def metrics():
	"""Prometheus text exposition of every live process's pool counters for this site."""
	from werkzeug.wrappers import Response

	frappe.only_for("System Manager")
	text = observe.render_prometheus(_processes(frappe.local.site))
	return Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")


def _processes(site: str) -> list[dict]:
	"""Published reports of all processes; this process's own view replaces its (older) published one."""
	mine = observe.reports(registry, site)
	try:
		published = publish.collect(frappe.conf.redis_cache, site)
	except Exception:
		published = []
	pid_host = {(r["host"], r["pid"]) for r in mine}
	return mine + [r for r in published if (r["host"], r["pid"]) not in pid_host]
