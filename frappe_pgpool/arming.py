"""The fallback: Frappe's before_request and before_job hooks arm a process that was not armed at start.

A process is armed at interpreter start by the package's .pth (see bootstrap). Where that did not
happen (the app runs from a path the process's environment did not install it into, a python -S,
FRAPPE_PGPOOL_DISABLE_PATCH), the first request or job of a site that has the app installed arms it
here, and the process says so once, naming the site and why. Nothing in Frappe 15 that an app can
hook runs before a web request's first query: `before_request` comes after `frappe.connect()` and
the session lookup, so that request keeps its plain connection and the pool serves from the next
one. A job's `before_job` runs before the job's first query, so jobs are pooled from the first.

Every later call returns after one global check. A process that cannot be armed (disabled, or a
Frappe version the patch refuses) publishes a report with `armed: "no"` for each pooled site it
serves, so `bench pgpool status` shows it rather than nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from . import armed_state, bootstrap

log = logging.getLogger("frappe_pgpool")

_done = False  # armed at start, or armed late and said so: nothing left to do in this process
_said_no = False
_published_no: dict[str, float] = {}


def before_request() -> None:
	if not _done:
		_check("before_request")


def before_job(**kwargs) -> None:
	if not _done:
		_check("before_job")


def _check(event: str) -> None:
	global _done, _said_no
	import frappe

	bootstrap.arm()  # imports and installs the patch now if the process was not armed
	state = armed_state.armed()
	if state == "start":
		_done = True
		return
	site = getattr(frappe.local, "site", None)
	if not site or not _pooled(site):
		return  # nothing was lost for this site; look again on the next request
	role = _role()
	if state == "hook":
		_done = True
		from .pool import registry

		db = getattr(frappe.local, "db", None)
		conn = db.__dict__.get("_conn") if db is not None else None
		unpooled = conn is not None and not registry.owns(conn)  # opened before the patch was in place
		log.warning(
			"frappe_pgpool: %s process %d was not armed at start: %s. Armed now by the %s hook of site %s: %s",
			role,
			os.getpid(),
			bootstrap.why_not_at_start(),
			event,
			site,
			"its first request went unpooled (its connection was opened before the hook ran); the next ones are pooled"
			if unpooled
			else "pooled from its first query on",
		)
		return
	if not _said_no:
		_said_no = True
		log.error(
			"frappe_pgpool: %s process %d serves site %s (db_pool_enabled) unpooled: %s",
			role,
			os.getpid(),
			site,
			_why_no(),
		)
	_publish_no(site, role)


def _pooled(site: str) -> bool:
	import frappe

	from .frappe_layer import site_pool_config

	return site_pool_config(site, frappe.local.conf) is not None


def _role() -> str:
	from .observe import process_role

	return process_role()


def _why_no() -> str:
	if os.environ.get(bootstrap.DISABLE_ENV) == "1":
		return f"{bootstrap.DISABLE_ENV}=1 is set in its environment"
	from . import patch

	if patch._unsupported:
		return f"Frappe {patch._unsupported} is not supported"
	return "the patch is not installed (uninstalled at run time?)"


def _publish_no(site: str, role: str) -> None:
	"""A report for this unpooled process, every PUBLISH_INTERVAL at most; best effort."""
	import frappe

	from . import publish

	now = time.monotonic()
	if now - _published_no.get(site, -publish.PUBLISH_INTERVAL) < publish.PUBLISH_INTERVAL:
		return
	_published_no[site] = now
	url = frappe.local.conf.get("redis_cache")
	if not url:
		return
	host, pid = socket.gethostname(), os.getpid()
	report = dict(host=host, pid=pid, role=role, reported_at=time.time(), site=site, pools=[], armed="no")
	try:
		publish._client(url).set(publish._key(site, host, pid), json.dumps(report), ex=publish.TTL)
	except Exception:
		pass  # stats are best effort; the log line above said it already
