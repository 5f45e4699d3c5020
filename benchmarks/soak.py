"""Soak: a sustained mixed load on a real bench with the pool on, sampling what must stay flat.

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local python benchmarks/soak.py --minutes 15

gunicorn sync workers behind a throwaway pgBouncer (session mode, SCRAM), one forking RQ worker
and one SimpleWorker, and a load of pings, ToDo lists, ToDo inserts, requests that fail after a
write (rolled back), and enqueued jobs that read the DB. Every few seconds: pgBouncer's clients
and server connections for the site, its login count, the workers' RSS, and the pools' figures
from `bench pgpool status --json`. Writes soak.md, soak.json and soak.png. Never runs in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import load_average, provenance  # noqa: E402
from tests.frappe.bench import BENCH, SITE, bench_cli, bench_problem, run_in_bench  # noqa: E402
from tests.frappe.e2e import Gunicorn, read_site_config, sites_behind_pgbouncer  # noqa: E402
from tests.frappe.test_e2e import JOBS_SCRIPT, TOKEN_SCRIPT  # noqa: E402

DEFAULT_MINUTES = 15.0


def rss_mb(pid: int) -> float:
	for line in Path(f"/proc/{pid}/status").read_text().splitlines():
		if line.startswith("VmRSS:"):
			return int(line.split()[1]) / 1024
	return 0.0


def bench_cmd(*args: str) -> subprocess.Popen:
	return subprocess.Popen(
		[str(Path(BENCH, "env", "bin", "python")), "-m", "frappe.utils.bench_helper", "frappe", *args],
		cwd=Path(BENCH, "sites"),
		stdout=subprocess.DEVNULL,
		stderr=subprocess.DEVNULL,
	)


def pool_status() -> list[dict]:
	result = bench_cli("pgpool", "status", "--json", timeout=60)
	return json.loads(result.stdout) if result.returncode == 0 else []


class Mix:
	"""Closed-loop clients sending a weighted mix; counts outcomes."""

	def __init__(self, web: Gunicorn, token: str, clients: int) -> None:
		self.web, self.token, self.clients = web, token, clients
		self.counts = {"ok": 0, "expected_error": 0, "unexpected": 0}
		self.lock = threading.Lock()
		self.stop = threading.Event()

	def one(self) -> str:
		kind = random.choices(["ping", "list", "insert", "fail"], weights=[50, 30, 15, 5])[0]
		if kind == "ping":
			code, _ = self.web.request("/api/method/ping", SITE, None)
		elif kind == "list":
			code, _ = self.web.request("/api/resource/ToDo?limit_page_length=20", SITE, self.token)
		elif kind == "insert":
			code, _ = self.web.request("/api/resource/ToDo", SITE, self.token, {"description": "soak"})
		else:  # writes one ToDo, then fails on the second: the request is rolled back
			code, _ = self.web.request(
				"/api/method/frappe.client.insert_many",
				SITE,
				self.token,
				{"docs": [{"doctype": "ToDo", "description": "soak-rolled-back"}, {"doctype": "ToDo"}]},
			)
			return "expected_error" if code >= 400 else "unexpected"
		return "ok" if code == 200 else "unexpected"

	def run(self) -> None:
		while not self.stop.is_set():
			try:
				outcome = self.one()
			except Exception:
				outcome = "unexpected"
			with self.lock:
				self.counts[outcome] += 1

	def start(self) -> list[threading.Thread]:
		threads = [threading.Thread(target=self.run, daemon=True) for _ in range(self.clients)]
		for t in threads:
			t.start()
		return threads


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
	)
	parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES)
	parser.add_argument("--workers", type=int, default=2)
	parser.add_argument("--clients", type=int, default=3)
	parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
	parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
	args = parser.parse_args()
	problem = bench_problem()
	if problem:
		print(f"soak needs a Frappe bench: {problem}", file=sys.stderr)
		return 2
	token = run_in_bench(TOKEN_SCRIPT)[0]
	db = read_site_config(SITE)["db_name"]
	samples: list[dict] = []
	with sites_behind_pgbouncer([SITE]) as (bouncer, upstream), Gunicorn(workers=args.workers) as web:
		args.provenance = provenance(postgres=upstream.connect, pgbouncer=bouncer.admin, bench=BENCH)
		print(args.provenance, flush=True)
		rq = [bench_cmd("worker", "--queue", "long")]  # forks a work-horse per job
		mix = Mix(web, token, args.clients)
		threads = mix.start()
		started = time.monotonic()
		logins0 = bouncer.logins(db)
		jobs = 0
		try:
			while time.monotonic() - started < args.minutes * 60:
				run_in_bench(JOBS_SCRIPT.format(n=20, queue="long"))
				jobs += 20
				time.sleep(args.sample)
				pools = [p for r in pool_status() for p in r["pools"]]
				clients = [c for c in bouncer.admin("SHOW CLIENTS") if c["database"] == db]
				servers = [s for s in bouncer.admin("SHOW SERVERS") if s["database"] == db]
				sample = {
					"t": round(time.monotonic() - started, 1),
					"requests": dict(mix.counts),
					"jobs_enqueued": jobs,
					"pgbouncer_clients": len(clients),
					"pgbouncer_servers": len(servers),
					"logins": bouncer.logins(db) - logins0,
					"worker_rss_mb": {pid: round(rss_mb(pid), 1) for pid in sorted(web.worker_pids())},
					"pool_size": sum(p["size"] for p in pools),
					"pool_in_use": sum(p["in_use"] for p in pools),
					"pool_created": sum(p["created"] for p in pools),
					"pool_checkouts": sum(p["checkouts"] for p in pools),
					"backends": len(
						upstream.query("SELECT 1 FROM pg_stat_activity WHERE datname = %s", (db,))
					),
				}
				samples.append(sample)
				print(json.dumps(sample), flush=True)
		finally:
			mix.stop.set()
			for t in threads:
				t.join(30)
			for p in rq:
				p.terminate()
				p.wait(30)
	args.load_at_end = load_average()
	args.out.mkdir(parents=True, exist_ok=True)
	data = {
		"provenance": args.provenance,
		"load_at_end": args.load_at_end,
		"minutes": args.minutes,
		"samples": samples,
	}
	(args.out / "soak.json").write_text(json.dumps(data, indent=1))
	write_report(samples, args)
	return 0


def write_report(samples: list[dict], args) -> None:
	first, last = samples[min(2, len(samples) - 1)], samples[-1]  # after warm-up
	rss_first = sum(first["worker_rss_mb"].values())
	rss_last = sum(last["worker_rss_mb"].values())
	total = sum(last["requests"].values())
	shorter = (
		f" A shortened run: --minutes {args.minutes:g} instead of the default {DEFAULT_MINUTES:g}."
		if args.minutes < DEFAULT_MINUTES
		else ""
	)
	lines = [
		"# Soak: sustained mixed load with the pool on",
		"",
		args.provenance,
		"",
		f"{args.workers} gunicorn sync workers, {args.clients} closed-loop clients "
		"(50% ping, 30% ToDo list, 15% ToDo insert, 5% a write then a failure), one RQ worker forking a "
		f"work-horse per job, {last['jobs_enqueued']} jobs enqueued; pgBouncer session mode, SCRAM. "
		f"{last['t'] / 60:.1f} minutes, a sample every {args.sample:g} s.{shorter} Load average (1/5/15 min) at "
		f"the end: {args.load_at_end} (the start's is in the line above). Generated by `benchmarks/soak.py`.",
		"",
		f"- requests: {total} ({last['requests']['ok']} ok, {last['requests']['expected_error']} failed on "
		f"purpose and rolled back, {last['requests']['unexpected']} unexpected failures)",
		f"- pgBouncer clients for the site: min {min(s['pgbouncer_clients'] for s in samples)}, "
		f"max {max(s['pgbouncer_clients'] for s in samples)}; server connections: min "
		f"{min(s['pgbouncer_servers'] for s in samples)}, max {max(s['pgbouncer_servers'] for s in samples)}",
		f"- web pools: size {min(s['pool_size'] for s in samples)}..{max(s['pool_size'] for s in samples)}, "
		f"in use at the end {last['pool_in_use']}, connections created {last['pool_created']} for "
		f"{last['pool_checkouts']} checkouts",
		f"- pgBouncer logins over the run: {last['logins']} (web workers at most one per worker per "
		f"db_pool_max_lifetime; the forking RQ worker one per job: {last['jobs_enqueued']} jobs; the enqueuing script one per batch of 20)",
		f"- web workers' RSS, sum: {rss_first:.1f} MB after warm-up, {rss_last:.1f} MB at the end "
		f"({rss_last - rss_first:+.1f} MB)",
		"",
		"| t s | requests | clients | servers | backends | pool size | in use | logins | RSS MB |",
		"|---|---|---|---|---|---|---|---|---|",
	]
	step = max(1, len(samples) // 15)
	for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
		lines.append(
			f"| {s['t']:.0f} | {sum(s['requests'].values())} | {s['pgbouncer_clients']} | {s['pgbouncer_servers']} | "
			f"{s['backends']} | {s['pool_size']} | {s['pool_in_use']} | {s['logins']} | "
			f"{sum(s['worker_rss_mb'].values()):.1f} |"
		)
	(args.out / "soak.md").write_text("\n".join(lines) + "\n")
	print("\n".join(lines))
	try:
		plot(samples, args.out / "soak.png")
	except ImportError:
		print("matplotlib not installed: no soak.png (pip install -e '.[bench]')")


def plot(samples: list[dict], path: Path) -> None:
	import matplotlib

	matplotlib.use("Agg")
	import matplotlib.pyplot as plt

	t = [s["t"] / 60 for s in samples]
	fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
	top.plot(t, [s["pgbouncer_clients"] for s in samples], "--", label="pgBouncer clients (site)")
	top.plot(t, [s["pgbouncer_servers"] for s in samples], label="pgBouncer server connections")
	top.plot(t, [s["pool_size"] for s in samples], label="web pools' connections")
	top.set_ylabel("connections")
	top.set_ylim(0, max(s["pgbouncer_servers"] for s in samples) + 2)
	top.legend(loc="upper left")
	bottom.plot(t, [sum(s["worker_rss_mb"].values()) for s in samples], label="web workers' RSS (sum)")
	bottom.set_ylabel("MB")
	bottom.set_xlabel("minutes")
	bottom.set_ylim(0, max(sum(s["worker_rss_mb"].values()) for s in samples) * 1.25)
	bottom.legend(loc="lower right")
	fig.suptitle("Soak: connections and memory stay flat")
	fig.tight_layout()
	fig.savefig(path, dpi=100)


if __name__ == "__main__":
	raise SystemExit(main())
