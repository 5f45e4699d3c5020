"""Many sites on one bench: pool off vs on with the per-process budget, in one run.

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local python benchmarks/sites.py   # ./dev bench-sites

Quick sites copied from FRAPPE_SITE (frappe_pgpool/testing/sites.py): --sites of them with their own
database and user each ("own"), and --sites more in groups of --group that share one database and
user ("shared"). For each placement (pgBouncer session mode, pgBouncer transaction mode, no
pgBouncer) and each worker shape (4 sync workers, 2 gthread workers x 4 threads): pings spread
uniformly or Zipf-skewed over the sites of a shape, and over one site alone (the single-site
reference); pool off and on alternate, --rounds rounds each (the order turning every round), every
row on a fresh gunicorn and a fresh pgBouncer. The budget is left at its default ("auto"); in
transaction mode the sites say so (db_pool_pgbouncer_mode, or an empty reset query where that key does
not exist yet). One cell also alternates with a numeric db_pool_process_budget (settings rows).

Per row: req/s, p50/p95/p99, errors; the most pgBouncer clients and servers open at once (exact, from
its connection log), cl_waiting and PostgreSQL backends sampled every --sample seconds; logins
(pgBouncer's log, or new backends without it); hit rate (1 - new pooled connections / requests, and the
engine's own hits/misses/evictions as the processes publish them). The load generator is closed-loop
Python on the same 2 cores as everything else: it coordinates with the server (tails under overload are
understated), it cannot see what happens between two samples, and its CPU competes with the workers'.
Writes sites.md, sites.json (with every sample) and sites.png (benchmarks/plot.py). Removes its quick
sites at the end unless --keep-sites. About 20 minutes with the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import threading
import time
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import load_average, pgbouncer_version, provenance  # noqa: E402
from frappe_pgpool import doctor  # noqa: E402
from frappe_pgpool.pool.config import PoolConfig  # noqa: E402
from frappe_pgpool.testing.sites import make_quick_sites, remove_quick_sites  # noqa: E402
from tests.frappe.bench import BENCH, SITE, bench_problem, run_in_bench  # noqa: E402
from tests.frappe.e2e import Gunicorn  # noqa: E402
from tests.frappe.sites import (  # noqa: E402
	Sampler,
	backend_sessions,
	configs_restored,
	connection_timeline,
	logins,
	point_at,
	set_common_config,
	set_site_config,
	start_bouncer,
	timeline_peaks,
	upstream,
)

WORKERS = {"sync 4": (4, 1, 4), "gthread 2x4": (2, 4, 8)}  # name: (workers, threads, clients)
PLACEMENTS = ("session", "transaction", "direct")

COLLECT = """
import json
from frappe_pgpool import publish
conf = json.load(open("common_site_config.json"))
out(publish.collect(conf["redis_cache"]))
"""


def percentile(ordered: list[float], q: float) -> float:
	return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def zipf_weights(n: int, s: float) -> list[float]:
	return [1 / (rank**s) for rank in range(1, n + 1)]


def plan(sites: list[str], traffic: str, requests: int, seed: int, s: float) -> list[str]:
	rng = random.Random(seed)
	if traffic == "uniform":
		return [rng.choice(sites) for _ in range(requests)]
	return rng.choices(sites, weights=zipf_weights(len(sites), s), k=requests)


def make_shared_sites(names: list[str], group: int, prefix: str) -> list:
	"""Quick sites in groups of `group` sharing a database and user each (<prefix>1, <prefix>2, ...)."""
	quick = []
	for g in range(0, len(names), group):
		quick += make_quick_sites(BENCH, SITE, names[g : g + group], shared=f"{prefix}{g // group + 1}")
	return quick


def worker_cpu(web: Gunicorn) -> float:
	total = 0.0
	for pid in web.worker_pids():
		try:
			fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
		except OSError:
			continue
		total += (int(fields[11]) + int(fields[12])) / 100
	return total


def load(web: Gunicorn, calls: list[str], clients: int) -> tuple[list[float], dict[str, int], float]:
	"""Closed loop: `clients` threads send the pings of `calls` (site names) in order."""
	latencies: list[float] = []
	errors: dict[str, int] = {}
	lock = threading.Lock()
	cursor = iter(range(len(calls)))

	def client() -> None:
		while True:
			with lock:
				i = next(cursor, None)
			if i is None:
				return
			started = time.perf_counter()
			try:
				code, _ = web.request("/api/method/ping", calls[i])
				outcome = None if code == 200 else f"HTTP {code}"
			except Exception as e:
				outcome = type(e).__name__
			elapsed = time.perf_counter() - started
			with lock:
				if outcome is None:
					latencies.append(elapsed)
				else:
					errors[outcome] = errors.get(outcome, 0) + 1

	started = time.perf_counter()
	threads = [threading.Thread(target=client) for _ in range(clients)]
	for t in threads:
		t.start()
	for t in threads:
		t.join()
	return sorted(latencies), errors, time.perf_counter() - started


def downsample(timeline: list[tuple[float, int, int]], start: float, end: float, step: float = 0.1) -> list:
	"""[t, clients, servers] per `step` seconds of the window (the most of each in the step)."""
	out: dict[int, list] = {}
	state = (0, 0)
	for ts, clients, servers in timeline:
		if ts < start:
			state = (clients, servers)
			continue
		if ts > end:
			break
		slot = int((ts - start) / step)
		held = out.setdefault(slot, [round(slot * step, 2), *state])
		held[1], held[2] = max(held[1], clients), max(held[2], servers)
		state = (clients, servers)
	return [out[k] for k in sorted(out)]


def engine_counters(site_names: set[str]) -> dict:
	"""Sum of the published pool reports of the row's sites (the processes publish every 5 s)."""
	reports = [r for r in run_in_bench(COLLECT)[0] if r["site"] in site_names]
	hits = misses = 0
	evictions: dict[str, int] = {}
	budgets = {}
	for report in reports:
		for pool in report["pools"]:
			hits += pool.get("hits", 0) or 0
			misses += pool.get("misses", 0) or 0
			for reason, n in (pool.get("evictions") or {}).items():
				evictions[reason] = evictions.get(reason, 0) + n
		if isinstance(report.get("budget"), dict):
			budgets[report["pid"]] = report["budget"]
	return {"hits": hits, "misses": misses, "evictions": evictions, "budgets": budgets}


def row_bench(bouncer, quick: list, members: list[str], pool: str, workers: str):
	"""The row's bench as doctor sees it (its sites at the row's pgBouncer, as its processes apply the
	transaction-mode keys; this shape's gunicorn workers, no job process), and its admin console."""
	n_workers, threads, _ = WORKERS[workers]
	at = doctor.address(bouncer.host, bouncer.port)
	config = PoolConfig(enabled=pool == "on", **transaction_mode_config())
	by_name = {q.name: q for q in quick}
	clients = _TX_NOW.get("db_pool_process_clients", "auto")  # as the row's processes apply it
	sites = [
		doctor.Site(name, by_name[name].db_name, by_name[name].user, config, at, None, "auto", clients)
		for name in members
	]

	def admin():
		return psycopg2.connect(bouncer.dsn(bouncer.admin_user, bouncer.admin_password, "pgbouncer"))

	return doctor.Bench(tuple(sites), web=n_workers, threads=threads, jobs=0), {at: admin}


def doctor_servers(bouncer, quick: list, members: list[str], pool: str, workers: str) -> int | None:
	"""The most servers `bench pgpool doctor` says the row's pgBouncer may open for its sites (its real
	settings, read from the admin console; this shape's processes: gunicorn workers, no job process)."""
	if bouncer is None:
		return None
	bench, bouncers = row_bench(bouncer, quick, members, pool, workers)
	((at, admin),) = bouncers.items()
	try:
		return doctor.Bouncer.read(at, admin).opened(bench, bench.sites)
	except psycopg2.Error:
		return None


def doctor_apply(bouncer, quick: list, members: list[str], workers: str) -> tuple[str, str] | None:
	"""What `bench pgpool doctor --apply` does with db_pool_process_clients for the row's bench (its real
	pgBouncer settings and PostgreSQL's max_connections; this shape's gunicorn workers, no job process):
	a short label (the value, "off: <checks>" where it does not fit, "cannot tell: ..."), and doctor's
	report of the bench as the row runs it with what --apply says. None outside transaction mode."""
	if bouncer is None or _TX_NOW.get("db_pool_pgbouncer_mode") != "transaction":
		return None
	bench, bouncers = row_bench(bouncer, quick, members, "on", workers)
	report = doctor.render(doctor.examine(bench, bouncers, upstream().connect))
	advice = doctor.advise_process_clients(bench, bouncers, upstream().connect)
	if advice.value is not None:
		label = str(advice.value)
	elif advice.decided:
		label = "off: " + ", ".join(dict.fromkeys(f.check for f in advice.refused))
	else:
		label = "cannot tell: " + advice.reason.split(":")[0]
	text = f"{report}\n--apply: {label}\n  {advice.reason}" + (f"\n  fix: {advice.fix}" if advice.fix else "")
	return label, text


def idle_backend_memory(dbs: set[str]) -> dict | None:
	"""Memory of the idle PostgreSQL backends of these databases now (the servers pgBouncer keeps after
	serving Frappe requests): count, and per backend the mean Pss and private (clean + dirty) KiB from
	/proc/<pid>/smaps_rollup (needs the right to read PostgreSQL's processes: root, or its user)."""
	rows = upstream().query(
		"SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s) AND state = 'idle' "
		"AND backend_type = 'client backend'",
		(sorted(dbs),),
	)
	pss, private = [], []
	for (pid,) in rows:
		try:
			text = Path(f"/proc/{pid}/smaps_rollup").read_text()
		except OSError:
			continue
		kib = {
			line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.endswith("kB")
		}
		pss.append(kib.get("Pss", 0))
		private.append(kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0))
	if not pss:
		return None
	return {"n": len(pss), "pss_kib": sum(pss) / len(pss), "private_kib": sum(private) / len(private)}


def transaction_mode_config() -> dict:
	"""transaction_mode_settings() as PoolConfig fields (empty outside transaction mode rows)."""
	keys = set(PoolConfig.keys())  # the process-wide keys (db_pool_process_clients) are no PoolConfig field
	return {k.removeprefix("db_pool_"): v for k, v in _TX_NOW.items() if k in keys}


_TX_NOW: dict = {}  # the transaction-mode settings the current rows run with


def code_version() -> str:
	"""The commit measured, and whether frappe_pgpool/ differs from it (a tree hash names its content)."""
	import subprocess

	def git(*args: str) -> str:
		result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
		return result.stdout.strip()

	dirty = git("status", "--porcelain", "--", "frappe_pgpool")
	tree = git("rev-parse", "--short", "HEAD:frappe_pgpool")
	return f"{git('rev-parse', '--short', 'HEAD')} (frappe_pgpool/ tree {tree}" + (
		", with uncommitted changes)" if dirty else ")"
	)


def _tree(version: str) -> str:
	return version.split("(", 1)[-1]


PROCESS_CLIENTS: list = [None]  # --process-clients: db_pool_process_clients of the transaction rows


def transaction_mode_settings() -> dict:
	"""What a pooled site needs behind pgBouncer in transaction mode, with this version's keys, and the
	opt-in client budget (db_pool_process_clients) when --process-clients gives one."""
	keys = set(PoolConfig.keys())
	if "db_pool_pgbouncer_mode" in keys:
		settings: dict = {"db_pool_pgbouncer_mode": "transaction"}
		if PROCESS_CLIENTS[0] is not None:
			settings["db_pool_process_clients"] = PROCESS_CLIENTS[0]
		return settings
	return {"db_pool_reset_query": ""}


CELLS = (("own", "uniform"), ("own", "zipf"), ("shared", "zipf"), ("single", "one site"))
# Settings rows: pool on with a numeric db_pool_process_budget, alternated with the default rows of
# one cell (pgBouncer session mode, sync workers, own sites, Zipf) in every round.
VARIANTS = {"budget 2": {"db_pool_process_budget": 2}, "budget 4": {"db_pool_process_budget": 4}}
VARIANT_CELL = ("session", "sync 4", "own", "zipf")


class Run:
	def __init__(self, args) -> None:
		self.args = args
		self.rows: list[dict] = []
		self.doctor_texts: dict[str, str] = {}  # cell -> doctor's report and --apply, first pooled row

	def row(self, *, placement, workers, shape, traffic, pool, sites, calls, dbs, bouncer, **labels) -> dict:
		args = self.args
		n_workers, threads, clients = WORKERS[workers]
		set_site_config(self.all_sites, db_pool_enabled=int(pool == "on"))
		with Gunicorn(workers=n_workers, threads=threads) as web:
			warm = plan(sites, "uniform", args.warmup, 7, 0)
			# --warmup-cover: every site in turn, that many times per worker (each worker sees each site), then
			# the --warmup pings with the row's own traffic (a Zipf row's busy sites get their concurrency)
			if args.warmup_cover:
				turns = args.warmup_cover * n_workers * len(sites)
				warm = list(itertools.islice(itertools.cycle(sites), turns))
				warm += plan(sites, "zipf" if traffic == "zipf" else "uniform", args.warmup, 7, args.zipf)
			load(web, warm, clients)  # warm-up
			predicted = doctor_servers(bouncer, self.quick, sites, pool, workers)
			applied = doctor_apply(bouncer, self.quick, sites, workers) if pool == "on" else None
			if applied:
				label = f"{placement}, {workers}, {shape}, {traffic}"
				self.doctor_texts.setdefault(label, applied[1])
				applied = applied[0]
			logins0 = logins(bouncer, dbs) if bouncer else None
			sessions0 = backend_sessions(dbs)
			cpu0 = worker_cpu(web)
			pids = web.worker_pids()
			port = bouncer.port if bouncer else upstream().port
			# each worker's own TCP connections (exact per sample; a connection not kept has no application_name)
			sampler = Sampler(dbs, bouncer, args.sample, sockets=(lambda: pids, port))
			sampler.start()
			window = time.time()
			latencies, errors, elapsed = load(web, calls, clients)
			window = (window, time.time())
			samples = sampler.stop()
			memory = idle_backend_memory(dbs) if pool == "on" else None
			cpu = worker_cpu(web) - cpu0
			sessions = backend_sessions(dbs) - sessions0
			login_count = logins(bouncer, dbs) - logins0 if bouncer else sessions
			counters = None
			if pool == "on" and labels.get("counters"):
				time.sleep(5.5)  # one publishing round of every process after the last request
				counters = engine_counters(set(sites))
		requests = len(calls)
		exact = {"clients": None, "servers": None, "timeline": []}
		if bouncer is not None:
			timeline = connection_timeline(bouncer, dbs)
			exact["clients"], exact["servers"] = timeline_peaks(timeline, *window)
			exact["timeline"] = downsample(timeline, *window)
		row = {
			"placement": placement,
			"workers": workers,
			"shape": shape,
			"traffic": traffic,
			"pool": pool,
			"variant": labels.get("variant", "default"),
			"round": labels.get("round", 1),
			"sites": len(sites),
			"databases": len(dbs),
			"requests": requests,
			"clients": clients,
			"rps": len(latencies) / elapsed,
			"p50": percentile(latencies, 0.50),
			"p95": percentile(latencies, 0.95),
			"p99": percentile(latencies, 0.99),
			"errors": sum(errors.values()),
			"error_kinds": errors,
			"latencies_ms": [round(x * 1000, 2) for x in latencies],
			"logins": login_count,
			"new_backends": sessions,
			"hit_rate": (1 - login_count / requests) if pool == "on" else None,
			"worker_cpu_ms": cpu * 1000 / requests,
			"peak_clients": exact["clients"],
			"peak_servers": exact["servers"],
			"peak_clients_sampled": max((s.get("clients", 0) for s in samples), default=0)
			if bouncer
			else None,
			"peak_servers_sampled": max((s.get("servers", 0) for s in samples), default=0)
			if bouncer
			else None,
			"peak_cl_waiting": max((s.get("cl_waiting", 0) for s in samples), default=0) if bouncer else None,
			"peak_backends": max((s["backends"] for s in samples), default=0),
			"doctor_servers": predicted,
			"doctor_apply": applied,
			"idle_backend_memory": memory,
			"peak_backends_all": max((s["backends_all"] for s in samples), default=0),
			"peak_clients_per_process": max(
				[*(max(s.get("sockets_by_pid", {}).values(), default=0) for s in samples), 0]
			),
			"engine": counters,
			"samples": samples,
			"timeline": exact["timeline"],
			"sample_errors": sampler.errors[:5],
		}
		self.rows.append(row)
		brief = {k: v for k, v in row.items() if k not in ("samples", "engine", "timeline", "latencies_ms")}
		print(json.dumps(brief), flush=True)
		return row

	def placed_row(self, placement: str, quick: list, bouncer_settings: dict | None = None, **kw) -> dict:
		"""One row on a fresh pgBouncer in `placement` mode (or straight to PostgreSQL)."""
		bouncer = None
		if placement != "direct":
			settings = {
				"default_pool_size": self.args.pool_size,
				**dict(self.args.bouncer),
				**(bouncer_settings or {}),
			}
			bouncer = start_bouncer(quick, placement, **settings)
			point_at(self.all_sites, bouncer.host, bouncer.port)
		else:
			pg = upstream()
			point_at(self.all_sites, pg.host, pg.port)
		try:
			return self.row(placement=placement, bouncer=bouncer, **kw)
		finally:
			if bouncer is not None:
				bouncer.__exit__(None, None, None)  # stop it, remove its files

	def main(self) -> int:
		args = self.args
		if args.quick:  # written to /tmp unless --out says otherwise
			args.sites, args.group, args.requests, args.warmup, args.rounds = 4, 2, 150, 20, 2
			if args.out == ROOT / "benchmarks" / "results":
				args.out = Path("/tmp/pgpool-sites-quick")
		own = [f"own{i:02d}.sites.local" for i in range(1, args.sites + 1)]
		shared = [f"shr{i:02d}.sites.local" for i in range(1, args.sites + 1)]
		self.all_sites = own + shared
		t0 = time.monotonic()
		self.version = code_version()
		print(
			f"frappe_pgpool {self.version}; making {len(self.all_sites)} quick sites from {SITE}", flush=True
		)
		cells = [tuple(c.split(":", 1)) for c in args.cells] if args.cells else list(CELLS)
		if not any(shape == "shared" for shape, _ in cells):
			shared = []
			self.all_sites = own
		quick = make_quick_sites(BENCH, SITE, own) + make_shared_sites(shared, args.group, "grp")
		self.quick = quick
		by_name = {q.name: q for q in quick}
		print(f"quick sites ready in {time.monotonic() - t0:.1f}s", flush=True)
		pgbouncer = None  # its version, from a pgBouncer like the rows' (each row starts its own)
		if any(p != "direct" for p in args.placements):
			probe = start_bouncer(quick[:1])
			try:
				pgbouncer = pgbouncer_version(probe.admin)
			finally:
				probe.__exit__(None, None, None)
		self.provenance = provenance(postgres=upstream().connect, pgbouncer=pgbouncer, bench=BENCH)
		print(self.provenance, flush=True)
		shapes = {"own": own, "shared": shared, "single": own[:1]}
		# removed before each placement and at the end, whatever an earlier run or test left there (a
		# db_pool_process_clients left in common_site_config.json would opt the default rows in)
		tx_keys = {k: None for k in [*transaction_mode_settings(), "db_pool_process_clients"]}
		try:
			with configs_restored(self.all_sites):
				for placement in args.placements:
					set_common_config(**tx_keys)
					_TX_NOW.clear()
					if placement == "transaction":
						set_common_config(**transaction_mode_settings())
						_TX_NOW.update(transaction_mode_settings())
					for workers in args.workers:
						for shape, traffic in cells:
							members = shapes[shape]
							dbs = {by_name[s].db_name for s in members}
							kind = "zipf" if traffic == "zipf" else "uniform"
							calls = plan(members, kind, args.requests, 1, args.zipf)
							states = [("off", "default"), ("on", "default")]
							if (placement, workers, shape, traffic) == VARIANT_CELL and not args.quick:
								states += [("on", name) for name in VARIANTS]
							for round_ in range(1, args.rounds + 1):
								# the order turns every round, so that a drift in the machine's load
								# (other work on it) hits every state alike
								turn = (round_ - 1) % len(states)
								for pool, variant in states[turn:] + states[:turn]:
									settings = VARIANTS.get(variant, {})
									set_common_config(**settings)
									try:
										self.placed_row(
											placement,
											quick,
											workers=workers,
											shape=shape,
											traffic=traffic,
											pool=pool,
											sites=members,
											calls=calls,
											dbs=dbs,
											round=round_,
											variant=variant,
											counters=round_ == args.rounds,
										)
									finally:
										set_common_config(**{k: None for k in settings})
				set_common_config(**tx_keys)
		finally:
			if not args.keep_sites:
				remove_quick_sites(BENCH, self.all_sites)
		print(f"run took {(time.monotonic() - t0) / 60:.1f} minutes", flush=True)
		self.report(time.monotonic() - t0)
		return 0

	def report(self, seconds: float) -> None:
		args = self.args
		args.out.mkdir(parents=True, exist_ok=True)
		version = self.version
		if _tree(code_version()) != _tree(version) or "uncommitted" in version:
			version += f" at the start, {code_version()} at the end: frappe_pgpool/ changed during the run"
		merged = summary(self.rows)
		# sites.json: the merged rows, and every row without its latencies and with lighter samples
		rows = []
		for row in self.rows:
			light = {k: v for k, v in row.items() if k not in ("latencies_ms", "samples")}
			light["samples"] = [{k: s.get(k) for k in SAMPLE_FIELDS if k in s} for s in row["samples"]]
			rows.append(light)
		data = {
			"provenance": self.provenance,
			"load_at_end": load_average(),
			"version": version,
			"run_seconds": round(seconds),
			"summary": merged,
			"rows": rows,
		}
		(args.out / f"{args.name}.json").write_text(json.dumps(data, separators=(",", ":"), default=str))
		self.write(data)

	def write(self, data: dict) -> None:
		"""sites.md and sites.png from what sites.json holds (also for --report-only)."""
		args = self.args
		(args.out / f"{args.name}.md").write_text(
			render(
				data["summary"],
				args,
				data["run_seconds"],
				data["version"],
				data.get("provenance", ""),
				data.get("load_at_end", ""),
			)
		)
		print((args.out / f"{args.name}.md").read_text())
		if self.doctor_texts:  # not for --report-only: the reports are not in the JSON
			(args.out / f"{args.name}-doctor.txt").write_text(
				f"# bench pgpool doctor (checks and --apply) for each transaction-mode cell's bench, {data.get('provenance', '')}"
				"\n# the row's pgBouncer settings (admin console) and PostgreSQL; this shape's gunicorn workers, no job "
				"process; written by benchmarks/sites.py from the cell's first pooled row, before its measured pings\n\n"
				+ "\n\n".join(f"## {cell}\n{text}" for cell, text in self.doctor_texts.items())
				+ "\n"
			)
		try:
			sys.path.insert(0, str(ROOT / "benchmarks"))
			from plot import sites as draw

			draw(data, args.out / f"{args.name}.png")
		except ImportError as e:
			print(f"no plot: {e} (pip install -e '.[bench]')")


SAMPLE_FIELDS = ("t", "clients", "servers", "cl_waiting", "backends", "backends_all")


def cell_key(r: dict) -> tuple:
	return (r["placement"], r["workers"], r["shape"], r["traffic"])


def summary(rows: list[dict]) -> list[dict]:
	"""Rounds of the same (cell, pool, variant) merged: median req/s, percentiles over every round's
	latencies, sums and peaks."""
	groups: dict[tuple, list[dict]] = {}
	for r in rows:
		groups.setdefault((*cell_key(r), r["pool"], r["variant"]), []).append(r)
	out = []
	for members in groups.values():
		first = members[0]

		def mean(name: str, members=members) -> float:
			return sum(m[name] for m in members) / len(members)

		def median(name: str, members=members) -> float:
			return _median([m[name] for m in members])

		latencies = sorted(x / 1000 for m in members for x in m.get("latencies_ms", []))

		def peak(name: str, members=members):
			values = [m[name] for m in members if m[name] is not None]
			return max(values) if values else None

		hits = [m["hit_rate"] for m in members if m["hit_rate"] is not None]
		out.append(
			{
				**{
					k: first[k]
					for k in ("placement", "workers", "shape", "traffic", "pool", "variant", "sites")
				},
				"rounds": len(members),
				"rps": median("rps"),
				"rps_rounds": [m["rps"] for m in members],
				"p95_rounds": [m["p95"] for m in members],
				"p50": percentile(latencies, 0.50) if latencies else mean("p50"),
				"p95": percentile(latencies, 0.95) if latencies else mean("p95"),
				"p99": percentile(latencies, 0.99) if latencies else mean("p99"),
				"errors": sum(m["errors"] for m in members),
				"logins": sum(m["logins"] for m in members),
				"requests": sum(m["requests"] for m in members),
				"hit_rate": sum(hits) / len(hits) if hits else None,
				"peak_clients": peak("peak_clients"),
				"peak_servers": peak("peak_servers"),
				"peak_cl_waiting": peak("peak_cl_waiting"),
				"peak_backends": peak("peak_backends"),
				"doctor_servers": peak("doctor_servers") if "doctor_servers" in first else None,
				"doctor_apply": "/".join(
					sorted({str(m["doctor_apply"]) for m in members if m.get("doctor_apply")})
				)
				or None,
				"idle_backend_memory": next(
					(m["idle_backend_memory"] for m in reversed(members) if m.get("idle_backend_memory")),
					None,
				),
				"peak_clients_per_process": peak("peak_clients_per_process"),
				"worker_cpu_ms": mean("worker_cpu_ms"),
				"engine": next((m["engine"] for m in reversed(members) if m["engine"]), None),
			}
		)
	return out


# two-sided 95% quantiles of Student's t, by degrees of freedom (beyond the table: the normal's 1.96)
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20}
_T95 |= {12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 20: 2.09, 30: 2.04, 40: 2.02, 60: 2.00, 120: 1.98}


def rounds_paired(on: dict, off: dict, field: str) -> list[tuple[float, float]]:
	"""(on, off) of each round: both ran in round i, one right after the other (a variant up to two rows
	apart), so a drift of the machine's load hits both. The lists are in round order (summary)."""
	return list(zip(on[f"{field}_rounds"], off[f"{field}_rounds"], strict=True))


def paired_ratio(pairs: list[tuple[float, float]]) -> tuple[float, float, float] | None:
	"""on/off over paired rounds: the geometric mean of the per-round ratios and its 95% confidence
	interval (t over the log ratios). None with fewer than two pairs."""
	pairs = [(a, b) for a, b in pairs if a > 0 and b > 0]
	n = len(pairs)
	if n < 2:
		return None
	logs = [math.log(a / b) for a, b in pairs]
	mean = sum(logs) / n
	sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
	# the largest tabulated degrees of freedom not above n - 1: the interval errs wide, never narrow
	t = _T95[max(k for k in _T95 if k <= n - 1)]
	half = t * sd / math.sqrt(n)
	return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def ratio_text(ratio: tuple[float, float, float] | None, digits: int = 2) -> str:
	if ratio is None:
		return "-"
	mean, low, high = (f"{x:.{digits}f}" for x in ratio)
	return f"x{mean} [{low}, {high}]"


def _median(values: list[float]) -> float:
	ordered = sorted(values)
	middle = len(ordered) // 2
	return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _opt(value, fmt: str = "{}") -> str:
	return "-" if value is None else fmt.format(value)


def _budgets(engine: dict | None) -> str:
	if not engine or not engine["budgets"]:
		return "-"
	# a process's transaction-mode pools share its client budget (db_pool_process_clients): shown where used
	return " ".join(
		"/".join(str(b.get("clients", b).get(k, "?")) for k in ("open", "limit", "peak"))
		for b in engine["budgets"].values()
	)


def render(
	merged: list[dict], args, seconds: float, version: str = "", ran_on: str = "", load_at_end: str = ""
) -> str:
	lines = [
		"# Many sites on one bench: pool off vs on (per-process budget at its default)",
		"",
		*([ran_on, ""] if ran_on else []),
		f"`/api/method/ping` on quick sites copied from one site: {args.sites} sites with their "
		f"own database and user (`own`), {args.sites} sites in groups of {args.group} sharing a database and user "
		"(`shared`), and one site alone (`single`: the single-site reference). Traffic over a shape's sites is "
		f"uniform or Zipf (s={args.zipf:g}: site k gets weight 1/k^s, so the top site gets "
		f"{zipf_weights(args.sites, args.zipf)[0] / sum(zipf_weights(args.sites, args.zipf)):.0%} of the pings). "
		"Workers: `sync 4` = 4 sync gunicorn workers with 4 closed-loop clients, `gthread 2x4` = 2 gthread "
		"workers x 4 threads with 8 clients. Placements: pgBouncer in session mode, in transaction mode "
		f"(both SCRAM, default_pool_size {args.pool_size}), and `direct` (workers straight to PostgreSQL, "
		"max_connections 100, trust). Every row runs on a fresh gunicorn and a fresh pgBouncer: "
		f"{args.warmup} warm-up pings, then {args.requests} measured; pool off and on alternate, {args.rounds} "
		"rounds of each, the order turning every round. In transaction mode the pooled rows set "
		f"`{json.dumps(transaction_mode_settings())}` in common_site_config. Run time {seconds / 60:.1f} "
		"min on a 2-core machine shared with other work (other developers' test runs: rounds of one row can differ by "
		"half or more, see the brackets: compare within a cell). Generated by `benchmarks/sites.py` on "
		f"frappe_pgpool {version}."
		+ (
			f" Load average (1/5/15 min) at the end: {load_at_end} (the start's is in the first line)."
			if load_at_end
			else ""
		),
		"",
		"Columns: req/s is the median of the rounds (each round in brackets), latencies are over every "
		"round's pings; `clients`/`servers` = most pgBouncer client / "
		"server connections of the row's databases open at once during the measured pings, exact, from "
		f"pgBouncer's connection log; `cl_waiting` = peak of SHOW POOLS sampled every {args.sample:g} s; "
		"`backends` = peak of PostgreSQL backends of those databases in pg_stat_activity, same samples "
		"(sampling misses most of plain Frappe's connections, which live a few ms: in `direct` rows it "
		"understates the pool-off peak, which is one per running request); `per proc` = most TCP "
		"connections to pgBouncer (`direct`: to PostgreSQL) one worker held at once in the samples (/proc); `logins` = "
		"pgBouncer client logins per 1000 pings (`direct`: new backends, from pg_stat_database.sessions); "
		"`hit` = 1 - new pooled connections / requests; `doctor` = the most servers `bench pgpool doctor` "
		"says the row's pgBouncer may open for its sites, from its real settings (this shape's gunicorn "
		"workers, no job process). The load generator is closed-loop Python on the same "
		"cores: it coordinates with the server (tails under overload are understated), it sees nothing "
		"between two samples, and its CPU competes with the workers'.",
		"",
		"| placement | workers | shape | traffic | pool | req/s (rounds) | p50 ms | p95 ms | p99 ms | errors | "
		"logins/1000 | hit | clients | per proc | servers | doctor | cl_waiting | backends | worker CPU ms/req |",
		"|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
	]
	for r in merged:
		name = r["pool"] if r["variant"] == "default" else f"on, {r['variant']}"
		rounds = "/".join(f"{x:.0f}" for x in r["rps_rounds"])
		lines.append(
			f"| {r['placement']} | {r['workers']} | {r['shape']} | {r['traffic']} | {name} | "
			f"{r['rps']:.0f} ({rounds}) | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['errors']} | "
			f"{r['logins'] * 1000 / r['requests']:.0f} | {_opt(r['hit_rate'], '{:.0%}')} | "
			f"{_opt(r['peak_clients'])} | {r['peak_clients_per_process']} | {_opt(r['peak_servers'])} | "
			f"{_opt(r.get('doctor_servers'))} | {_opt(r['peak_cl_waiting'])} | {r['peak_backends']} | "
			f"{r['worker_cpu_ms']:.2f} |"
		)
	offs = {cell_key(r): r for r in merged if r["pool"] == "off"}
	ons = [r for r in merged if r["pool"] == "on" and cell_key(r) in offs]
	single = {
		(r["placement"], r["workers"]): r["rps"] / offs[cell_key(r)]["rps"]
		for r in ons
		if r["shape"] == "single" and r["variant"] == "default"
	}
	lines += [
		"",
		"## On vs off",
		"",
		"`paired` = the geometric mean of on/off over the rounds, each round's pooled row against the pool-off "
		"row of the same round, with its 95% confidence interval (Student's t over the log ratios): an interval "
		"that holds 1 is a difference this run cannot tell from the machine's noise.",
		"",
		"| placement | workers | shape | traffic | pool | req/s on/off | req/s paired | p95 on/off | p95 paired | "
		"errors off/on | servers off -> on | backends off -> on | hit | share of the single-site gain |",
		"|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
	]
	# plain Frappe's most server connections with this placement and worker shape, over all its rows
	plain_peak: dict[tuple, int] = {}
	for r in merged:
		if r["pool"] == "off" and r["peak_servers"] is not None:
			key = (r["placement"], r["workers"])
			plain_peak[key] = max(plain_peak.get(key, 0), r["peak_servers"])
	verdicts, noise = [], []
	for on in ons:
		off = offs[cell_key(on)]
		ratio = on["rps"] / off["rps"]
		base = single.get((on["placement"], on["workers"]))
		share = (ratio - 1) / (base - 1) if base and base > 1 and on["shape"] != "single" else None
		servers = f"{off['peak_servers']} -> {on['peak_servers']}" if off["peak_servers"] is not None else "-"
		name = "on" if on["variant"] == "default" else f"on, {on['variant']}"
		rps_paired = paired_ratio(rounds_paired(on, off, "rps"))
		p95_paired = paired_ratio(rounds_paired(on, off, "p95"))
		lines.append(
			f"| {on['placement']} | {on['workers']} | {on['shape']} | {on['traffic']} | {name} | {ratio:.2f} | "
			f"{ratio_text(rps_paired)} | {on['p95'] / off['p95']:.2f} | {ratio_text(p95_paired)} | "
			f"{off['errors']}/{on['errors']} | {servers} | "
			f"{off['peak_backends']} -> {on['peak_backends']} | {_opt(on['hit_rate'], '{:.0%}')} | "
			f"{_opt(share, '{:.0%}')} |"
		)
		if on["variant"] != "default":
			continue
		worse, unclear = [], []
		if on["errors"]:
			worse.append(f"{on['errors']} errors")
		if ratio < 1 or (rps_paired and rps_paired[0] < 1):
			beyond = rps_paired is not None and rps_paired[2] < 1
			(worse if beyond else unclear).append(f"req/s x{ratio:.2f}, paired {ratio_text(rps_paired)}")
		if on["p95"] > off["p95"] or (p95_paired and p95_paired[0] > 1):
			beyond = p95_paired is not None and p95_paired[1] > 1
			(worse if beyond else unclear).append(
				f"p95 x{on['p95'] / off['p95']:.2f}, paired {ratio_text(p95_paired)}"
			)
		plain = plain_peak.get((on["placement"], on["workers"]))
		if (
			on["placement"] != "transaction"
			and on["peak_servers"] is not None
			and plain is not None
			and on["peak_servers"] > plain
		):
			worse.append(f"pgBouncer servers {on['peak_servers']}, plain Frappe's peak {plain}")
		if on["placement"] == "direct" and on["peak_backends"] > WORKERS[on["workers"]][2]:
			worse.append(f"backends {on['peak_backends']} > {WORKERS[on['workers']][2]} requests in flight")
		if on["traffic"] == "zipf" and share is not None and share < 0.5:
			worse.append(f"{share:.0%} of the single-site gain")
		if on["placement"] == "transaction" and on["shape"] != "single":
			# issue 24's goal: many tenants at single-site speed behind a transaction pooler
			if not rps_paired or rps_paired[0] < 2.5:
				worse.append(f"req/s paired {ratio_text(rps_paired)} < x2.5")
			if not p95_paired or p95_paired[0] > 0.5:
				worse.append(f"p95 paired {ratio_text(p95_paired)} > x0.5")
			if on["logins"]:
				worse.append(f"{on['logins']} logins after warm-up")
		predicted = on.get("doctor_servers")
		for name in ("peak_servers", "peak_backends"):
			if predicted is not None and on[name] is not None and on[name] > predicted:
				worse.append(f"{name} {on[name]} > doctor's {predicted}")
		cell = f"- {on['placement']}, {on['workers']}, {on['shape']}, {on['traffic']}: "
		if worse:
			verdicts.append(cell + "; ".join(worse))
		if unclear:
			noise.append(cell + "; ".join(unclear))
	lines += [
		"",
		"## Goals missed (defaults)",
		"",
		"Slower req/s or a higher p95 only where the paired rounds' 95% interval lies beyond 1 (a difference "
		"beyond the noise of this shared machine); servers against plain Frappe's peak for the same placement "
		"and workers over all its rows (one per request in flight; in transaction mode pgBouncer's settings bound "
		"them instead: servers and backends against doctor's prediction); the share of the single-site gain; "
		"in transaction mode, many sites: req/s at least x2.5 and p95 at most x0.5 (paired), no login after "
		"the warm-up.",
		"",
	]
	lines += verdicts or ["- none: every pooled row is at least as good as its pool-off row"]
	lines += [
		"",
		"Slower or higher in the medians, but not told from the noise (the paired interval holds 1):",
		"",
	]
	lines += noise or ["- none"]
	# the cells where the pool kept almost nothing take plain Frappe's path plus the pool's bookkeeping:
	# together their paired rounds say what that path costs, closer than any one cell can
	plain_path = [
		(on, offs[cell_key(on)])
		for on in ons
		if on["variant"] == "default" and on["shape"] != "single" and (on["hit_rate"] or 0) < 0.1
	]
	if plain_path:
		rps = [pair for on, off in plain_path for pair in rounds_paired(on, off, "rps")]
		p95 = [pair for on, off in plain_path for pair in rounds_paired(on, off, "p95")]
		lines += [
			"",
			f"The cells where the pool kept almost nothing (hit < 10%: {len(plain_path)} cells, {len(rps)} "
			"paired rounds), all together: nearly every request takes plain Frappe's path plus the pool's "
			"bookkeeping (and the few kept misses of those cells): req/s "
			f"{ratio_text(paired_ratio(rps))}, p95 {ratio_text(paired_ratio(p95))}.",
		]
	engine = [r for r in merged if r["engine"]]
	if engine:
		lines += [
			"",
			"## The engine's own counters (pooled rows, last round, warm-up included, as the processes published them)",
			"",
			"| placement | workers | shape | traffic | pool | hits | misses | evictions by reason | "
			"open/limit/peak per process |",
			"|---|---|---|---|---|---|---|---|---|",
		]
		for r in engine:
			e = r["engine"]
			evictions = ", ".join(f"{k}={v}" for k, v in sorted(e["evictions"].items())) or "-"
			name = "on" if r["variant"] == "default" else f"on, {r['variant']}"
			lines.append(
				f"| {r['placement']} | {r['workers']} | {r['shape']} | {r['traffic']} | {name} | {e['hits']} | "
				f"{e['misses']} | {evictions} | {_budgets(e)} |"
			)
	applied = [r for r in merged if r.get("doctor_apply")]
	if applied:
		lines += [
			"",
			"## What `bench pgpool doctor --apply` sets db_pool_process_clients to for each cell's bench",
			"",
			"Computed in each pooled row, before its measured pings, from the row's pgBouncer (admin console) and "
			"PostgreSQL: the largest value every doctor check accepts, or off and the checks that refuse any.",
			"",
			"| placement | workers | shape | traffic | doctor --apply |",
			"|---|---|---|---|---|",
		]
		for r in applied:
			lines.append(
				f"| {r['placement']} | {r['workers']} | {r['shape']} | {r['traffic']} | {r['doctor_apply']} |"
			)
	memory = [r for r in merged if r.get("idle_backend_memory")]
	if memory:
		lines += [
			"",
			"## Idle PostgreSQL backends kept by pgBouncer after the pooled rows (/proc/<pid>/smaps_rollup)",
			"",
			"| placement | workers | shape | traffic | idle backends | Pss KiB each | private KiB each |",
			"|---|---|---|---|---|---|---|",
		]
		for r in memory:
			m = r["idle_backend_memory"]
			lines.append(
				f"| {r['placement']} | {r['workers']} | {r['shape']} | {r['traffic']} | {m['n']} | "
				f"{m['pss_kib']:.0f} | {m['private_kib']:.0f} |"
			)
	lines += ["", f"![plot]({args.name}.png) (drawn by `benchmarks/plot.py`)"]
	return "\n".join(lines) + "\n"


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--sites", type=int, default=20, help="sites per shape (own, shared)")
	parser.add_argument("--group", type=int, default=5, help="shared shape: sites per database and user")
	parser.add_argument("--requests", type=int, default=400, help="measured pings per row")
	parser.add_argument("--warmup", type=int, default=40)
	parser.add_argument("--rounds", type=int, default=4, help="rounds of pool off/on per cell")
	parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s")
	parser.add_argument("--pool-size", type=int, default=20, help="pgBouncer default_pool_size")
	parser.add_argument("--sample", type=float, default=0.25, help="seconds between samples")
	parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
	parser.add_argument("--workers", nargs="+", default=list(WORKERS), choices=list(WORKERS))
	parser.add_argument(
		"--cells",
		nargs="+",
		choices=[f"{shape}:{traffic}" for shape, traffic in CELLS],
		help="shape:traffic cells to run (default: all)",
	)
	parser.add_argument(
		"--bouncer",
		nargs="+",
		default=[],
		type=lambda kv: tuple(kv.split("=", 1)),
		metavar="KEY=VALUE",
		help="more pgBouncer settings (e.g. max_db_connections=4 server_idle_timeout=60)",
	)
	parser.add_argument(
		"--warmup-cover",
		type=int,
		default=0,
		help="warm up with every site in turn, N x workers times (instead of --warmup random pings)",
	)
	parser.add_argument(
		"--process-clients",
		type=int,
		help="transaction-mode rows: set db_pool_process_clients (opt-in client budget) to N",
	)
	parser.add_argument("--quick", action="store_true", help="a small run to try the harness")
	parser.add_argument("--keep-sites", action="store_true")
	parser.add_argument(
		"--report-only", action="store_true", help="render sites.md and the plot from sites.json"
	)
	parser.add_argument("--name", default="sites")
	parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
	args = parser.parse_args()
	PROCESS_CLIENTS[0] = args.process_clients
	if args.report_only:  # the report and plot again from sites.json, e.g. after a change to them
		Run(args).write(json.loads((args.out / f"{args.name}.json").read_text()))
		return 0
	problem = bench_problem()
	if problem:
		print(f"sites benchmark needs a Frappe bench: {problem}", file=sys.stderr)
		return 2
	return Run(args).main()


if __name__ == "__main__":
	raise SystemExit(main())
