"""Rendering of pool reports: a table like pgBouncer's SHOW POOLS, and Prometheus text.

No Frappe import. A report is one process's view of one site:
{"site", "host", "pid", "role", "reported_at", "pools": [ConnectionPool.snapshot(), ...]}, and, from
processes that have them, "budget" (the registry's per-process budget: {"process_budget", "limit", "open",
"peak", ...}) and "armed" ("start", "hook" or "no": how the patch was armed). A pool snapshot may carry "hits", "misses"
and "evictions" (by reason). Reports of older processes lack these keys: every reader uses .get.

What a process publishes is bounded (reports(detail=...)): at most DETAIL_POOLS pools one by one, and one
more report, site OTHER, whose one row sums the others and the pools the registry dropped ("pools" and
"dropped" count them), so that the process totals keep every checkout.
"""

from __future__ import annotations

import heapq
import os
import socket
import sys
import time
from collections.abc import Iterable

from .pool import PoolRegistry
from .pool.registry import add_counters

OTHER = "(other)"  # the site of the report that sums the pools not reported one by one
DETAIL_POOLS = 32  # pools a process publishes one by one, at most
_GAUGES = ("max_size", "size", "idle", "in_use", "opening", "waiting")
_HIGHEST = ("wait_seconds_p50", "wait_seconds_p95", "wait_seconds_p99", "oldest_connection_seconds")


def process_role(argv: list[str] | None = None) -> str:
	"""web, worker, scheduler or other: what kind of Frappe process this is, from its command line."""
	words = " ".join(argv if argv is not None else sys.argv)
	if "gunicorn" in words or "frappe.app" in words or "serve" in words.split():
		return "web"
	if "schedule" in words:
		return "scheduler"
	if "worker" in words or "rq" in words.split():
		return "worker"
	return "other"


def process_fields(registry: PoolRegistry) -> dict:
	"""This process's own fields of a report: how it was armed, the app's version it runs, and its budget
	where the registry has one."""
	from . import __version__
	from .armed_state import armed  # no Frappe import

	fields: dict[str, object] = {"armed": armed(), "version": __version__}
	snapshot = getattr(registry, "snapshot", None)  # the per-process budget: setting, limit, open, peak, ...
	if callable(snapshot):
		try:
			budget = snapshot()
		except Exception:
			budget = None
		if isinstance(budget, dict):
			fields["budget"] = budget
	return fields


def reports(
	registry: PoolRegistry, site: str | None = None, detail: int | None = None, seen: dict | None = None
) -> list[dict]:
	"""This process's reports, one per site it pools (or only `site`).

	With `detail` (all sites): at most that many pools one by one, those holding connections first, then
	the busiest by checkouts since the last call (`seen`, kept by the caller, has the counts of then);
	the others and the dropped pools summed in one more report, of site OTHER. O(pools): a few attribute
	reads per pool, a snapshot only of those reported.
	"""
	census = getattr(registry, "census", None)
	pools, dropped = census() if callable(census) else (registry.pools(), {})
	rest: list = []
	if site is not None:
		pools = {key: pool for key, pool in pools.items() if key.site == site}
	elif detail is not None:
		last = seen if seen is not None else {}
		now = {key: pool.stats.checkouts for key, pool in pools.items()}

		def busy(item) -> tuple:
			key, pool = item
			checkouts = now[key]
			recent = checkouts - last.get(key, 0)
			return (pool.held() > 0, recent if recent >= 0 else checkouts, checkouts)

		if len(pools) > detail:
			shown = dict(heapq.nlargest(detail, pools.items(), key=busy))
			rest = [pool for key, pool in pools.items() if key not in shown]
			pools = shown
		if seen is not None:
			seen.clear()
			seen.update(now)
	by_site: dict[str, list[dict]] = {}
	for key, pool in pools.items():
		by_site.setdefault(key.site, []).append(pool.snapshot())
	base = {
		"host": socket.gethostname(),
		"pid": os.getpid(),
		"role": process_role(),
		"reported_at": time.time(),
		**process_fields(registry),
	}
	out = [{**base, "site": name, "pools": rows} for name, rows in sorted(by_site.items())]
	if site is None and detail is not None and (rest or dropped.get("pools")):
		out.append({**base, "site": OTHER, "pools": [summed(rest, dropped)]})
	return out


def summed(pools: list, dropped: dict) -> dict:
	"""One row for many pools: gauges and counters summed (with the dropped pools' counters), the highest
	wait percentiles and age; "pools" and "dropped" say how many it sums."""
	row: dict = {name: 0 for name in _GAUGES}
	row.update({name: 0.0 for name in _HIGHEST})
	for pool in pools:
		snapshot = pool.snapshot()
		for name in _GAUGES:
			row[name] += snapshot[name]
		for name in _HIGHEST:
			row[name] = max(row[name], snapshot[name])
		add_counters(row, snapshot)
	add_counters(row, dropped)
	count = dropped.get("pools", 0)
	row.update(name=f"{len(pools)} pools not shown one by one, {count} dropped", pid=os.getpid())
	row.update(pools=len(pools), dropped=count, reuse_rate=None)
	return row


def hit_rate(pool: dict) -> float | None:
	"""Checkouts served by an idle connection / all checkouts that counted hits and misses."""
	hits, misses = pool.get("hits"), pool.get("misses")
	if not isinstance(hits, int | float) or not isinstance(misses, int | float) or hits + misses <= 0:
		return None
	return hits / (hits + misses)


def evictions(pool: dict) -> dict[str, int]:
	"""Evictions by reason ({} when the report has none); a bare count shows as reason "all"."""
	value = pool.get("evictions")
	if isinstance(value, dict):
		return {str(k): v for k, v in value.items() if isinstance(v, int | float)}
	if isinstance(value, int | float) and value:
		return {"all": value}
	return {}


def with_rates(items: Iterable[dict]) -> list[dict]:
	"""Reports with each pool's hit_rate added where it can be computed (for --json and the API)."""
	out = []
	for report in items:
		pools = []
		for pool in report.get("pools", []):
			rate = hit_rate(pool)
			pools.append(pool if rate is None else {**pool, "hit_rate": round(rate, 4)})
		out.append({**report, "pools": pools})
	return out


def _budget_cell(report: dict) -> str:
	budget = report.get("budget")
	if not isinstance(budget, dict):
		return "-"
	clients = budget.get("clients") if isinstance(budget.get("clients"), dict) else None
	own = dict(budget)
	if clients is not None and isinstance(budget.get("open"), int) and isinstance(clients.get("open"), int):
		own["open"] = budget["open"] - clients["open"]  # the totals hold the client budget's too
	cell = "/".join(str(own.get(k, "?")) for k in ("open", "limit", "peak"))
	cell = f"{cell} (auto)" if budget.get("process_budget") == "auto" else cell
	if clients is not None:  # transaction-mode pools: kept clients, db_pool_process_clients
		cell += " + clients " + "/".join(str(clients.get(k, "?")) for k in ("open", "limit"))
	return cell


COLUMNS = (
	("host", 12),
	("pid", 7),
	("role", 9),
	("size", 6),
	("in_use", 6),
	("idle", 5),
	("wait", 5),
	("checkouts", 10),
	("hits", 8),
	("hit%", 5),
	("created", 8),
	("closed (by reason)", 28),
	("evicted (by reason)", 20),
	("wait ms p50/p95/p99", 20),
	("oldest", 7),
	("open/limit/peak", 18),
	("armed", 5),
)


def render_table(items: Iterable[dict]) -> str:
	"""One line per process and pool, and a total."""
	lines = ["  ".join(name.ljust(width) for name, width in COLUMNS).rstrip()]
	total = {"size": 0, "max": 0, "in_use": 0, "idle": 0, "waiting": 0, "checkouts": 0, "created": 0}
	hits = misses = evicted = 0
	counted = False
	for report in sorted(items, key=lambda r: (r["site"], r["host"], r["pid"])):
		for pool in report["pools"]:
			closed = ", ".join(f"{k}={v}" for k, v in sorted(pool["closed"].items())) or "-"
			evicts = evictions(pool)
			waits = "/".join(f"{pool[f'wait_seconds_{q}'] * 1000:.1f}" for q in ("p50", "p95", "p99"))
			rate = hit_rate(pool)
			cells = (
				report["host"][:12],
				report["pid"],
				report["role"],
				f"{pool['size']}/{pool['max_size']}",
				pool["in_use"],
				pool["idle"],
				pool["waiting"],
				pool["checkouts"],
				pool.get("hits", "-"),
				"-" if rate is None else f"{rate * 100:.0f}%",
				pool["created"],
				closed,
				", ".join(f"{k}={v}" for k, v in sorted(evicts.items())) or "-",
				waits,
				f"{pool['oldest_connection_seconds']:.0f}s",
				_budget_cell(report),
				report.get("armed", "-"),
			)
			lines.append(
				"  ".join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS, strict=True)).rstrip()
			)
			for field in ("size", "in_use", "idle", "waiting", "checkouts", "created"):
				total[field] += pool[field]
			total["max"] += pool["max_size"]
			if rate is not None:
				counted = True
				hits += pool["hits"]
				misses += pool["misses"]
			evicted += sum(evicts.values())
	line = (
		f"total: {total['size']}/{total['max']} connections, {total['in_use']} in use, {total['idle']} idle, "
		f"{total['waiting']} waiting; {total['checkouts']} checkouts, {total['created']} created"
	)
	if counted:
		line += f"; {hits} hits, {misses} misses ({hits / max(hits + misses, 1) * 100:.0f}% hit rate)"
	if evicted:
		line += f"; {evicted} evicted"
	lines.append(line)
	return "\n".join(lines)


_METRICS = (
	# (name, type, help, field or None for special handling)
	("frappe_pgpool_connections", "gauge", "Connections held by the pool, by state.", None),
	(
		"frappe_pgpool_max_size",
		"gauge",
		"db_pool_size: most connections this pool keeps (it may open more, closed on return).",
		"max_size",
	),
	("frappe_pgpool_waiting", "gauge", "Checkouts waiting for a free connection.", "waiting"),
	("frappe_pgpool_checkouts_total", "counter", "Connections handed out.", "checkouts"),
	("frappe_pgpool_connections_created_total", "counter", "Connections opened (logins).", "created"),
	("frappe_pgpool_connections_closed_total", "counter", "Connections closed, by reason.", None),
	("frappe_pgpool_hits_total", "counter", "Checkouts served by an idle pooled connection.", "hits"),
	("frappe_pgpool_misses_total", "counter", "Checkouts that had to open a connection.", "misses"),
	(
		"frappe_pgpool_over_size_total",
		"counter",
		"Connections opened while the pool kept db_pool_size: closed on return, as plain Frappe's.",
		"over_size",
	),
	("frappe_pgpool_evictions_total", "counter", "Idle connections evicted, by reason.", None),
	(
		"frappe_pgpool_reuse_rate",
		"gauge",
		"Share of the pool's last checkouts a kept connection would have served (the reuse gate's evidence).",
		"reuse_rate",
	),
	(
		"frappe_pgpool_connect_errors_total",
		"counter",
		"Failed attempts to open a connection.",
		"connect_errors",
	),
	("frappe_pgpool_timeouts_total", "counter", "Checkouts that gave up after db_pool_timeout.", "timeouts"),
	("frappe_pgpool_waits_total", "counter", "Checkouts that had to wait.", "waits"),
	(
		"frappe_pgpool_wait_seconds_total",
		"counter",
		"Time spent waiting for a connection.",
		"wait_seconds_total",
	),
	("frappe_pgpool_wait_seconds", "gauge", "Recent wait time percentiles (last 1024 waits).", None),
	(
		"frappe_pgpool_oldest_connection_seconds",
		"gauge",
		"Age of the oldest connection.",
		"oldest_connection_seconds",
	),
)


def _labels(**labels: object) -> str:
	def escape(value: object) -> str:
		return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

	return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


_PROCESS_METRICS = (
	# per process, not per site: labelled host, pid and role only
	(
		"frappe_pgpool_process_budget",
		"gauge",
		"Most connections the process may keep open across all sites now (db_pool_process_budget).",
		"limit",
	),
	("frappe_pgpool_process_connections_open", "gauge", "Connections the process holds, all sites.", "open"),
	("frappe_pgpool_process_connections_peak", "gauge", "Most connections the process held at once.", "peak"),
	("frappe_pgpool_process_armed", "gauge", "1, labelled how the patch was armed: start, hook or no.", None),
)


def _number(value: object) -> bool:
	return isinstance(value, int | float) and not isinstance(value, bool)


def render_prometheus(items: Iterable[dict]) -> str:
	"""Prometheus text exposition format 0.0.4, one series per process and pool."""
	items = list(items)
	out: list[str] = []
	for name, kind, help_text, field in _METRICS:
		out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
		for report in items:
			for pool in report["pools"]:
				base = {
					"site": report["site"],
					"host": report["host"],
					"pid": report["pid"],
					"role": report["role"],
				}
				if name == "frappe_pgpool_connections":
					for state in ("idle", "in_use", "opening"):
						out.append(f"{name}{_labels(**base, state=state)} {pool[state]}")
				elif name == "frappe_pgpool_connections_closed_total":
					for reason, count in sorted(pool["closed"].items()):
						out.append(f"{name}{_labels(**base, reason=reason)} {count}")
				elif name == "frappe_pgpool_evictions_total":
					for reason, count in sorted(evictions(pool).items()):
						out.append(f"{name}{_labels(**base, reason=reason)} {count}")
				elif name == "frappe_pgpool_wait_seconds":
					for q in ("0.5", "0.95", "0.99"):
						value = pool[f"wait_seconds_p{round(float(q) * 100)}"]
						out.append(f"{name}{_labels(**base, quantile=q)} {value:.6f}")
				elif _number(pool.get(field)):
					out.append(f"{name}{_labels(**base)} {pool[field]}")
	processes: dict[tuple, dict] = {}
	for report in items:
		processes.setdefault((report["host"], report["pid"]), report)
	for name, kind, help_text, field in _PROCESS_METRICS:
		out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
		for report in processes.values():
			base = {"host": report["host"], "pid": report["pid"], "role": report["role"]}
			budget = report.get("budget") if isinstance(report.get("budget"), dict) else {}
			if field is None and report.get("armed") is not None:
				out.append(f"{name}{_labels(**base, how=report['armed'])} 1")
			elif field is not None and _number(budget.get(field)):
				out.append(f"{name}{_labels(**base)} {budget[field]}")
	return "\n".join(out) + "\n"
