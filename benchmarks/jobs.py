"""Background jobs: Frappe 15's forking `bench worker` vs `bench pgpool worker`, same queue, same jobs.

    FRAPPE_BENCH_PATH=~/frappe-bench FRAPPE_SITE=site1.local python benchmarks/jobs.py [--jobs 2000]

--sites quick sites copied from FRAPPE_SITE (frappe_pgpool/testing/sites.py), behind one pgBouncer
(session mode, SCRAM, log_connections). Each row: --jobs short jobs (frappe_pgpool.testing.jobs.
insert_and_read: insert a ToDo, read it back), round-robin over the sites, enqueued ahead with
frappe.enqueue on queue `short`, then --workers worker processes started in burst mode and waited for:

- fork: `bench worker --queue short --burst` (Frappe 15: a work-horse per job);
- no-fork auto: `bench pgpool worker --queue short --burst --no-scheduler` (the default process budget);
- no-fork budget: the same with `--process-budget <sites>` (one kept connection per site).

Per row: jobs/s (from the workers' start to the last job's end, and from the first job's start to the
last's end), job latency from enqueue to finish (p50/p95: with every job enqueued ahead this is mostly
the wait in the queue) and from start to finish (p50/p95), pgBouncer logins and the most clients and
servers open at once (exact, from its log), PostgreSQL sessions started, rows counted per site
afterwards (lost = expected - distinct rows, duplicated = rows - distinct), job statuses. Timestamps are
rq's, stamped by the worker processes in Redis (microseconds): a horse's fork happens before its
start stamp, so start-to-finish excludes it; jobs/s from the workers' start includes each process's
start-up (importing Frappe). Nothing here samples CPU; the machine is shared and noisy.

Then the timeout case, per shape with one worker: a job waiting in `SELECT pg_sleep(600)` with a 2 s
timeout, then 20 short jobs: how long the job held the worker, its status, transactions left open and
sleeps still running in PostgreSQL afterwards, and the jobs after it. And memory: one no-fork worker
running --rss-jobs jobs with recycling off (--max-jobs 0 --max-memory 0) and with the defaults and
--respawn: RSS after its first job and after every 1000th (each job returns its process's RSS).

Writes benchmarks/results/jobs.md and jobs.json. Removes its quick sites at the end unless --keep-sites.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import load_average, provenance  # noqa: E402
from frappe_pgpool.testing.sites import make_quick_sites, remove_quick_sites  # noqa: E402
from tests.frappe.bench import BENCH, SITE, bench_problem, run_in_bench  # noqa: E402
from tests.frappe.sites import (  # noqa: E402
	backend_sessions,
	configs_restored,
	connection_timeline,
	logins,
	point_at,
	start_bouncer,
	timeline_peaks,
	upstream,
)

QUEUE = "short"
JOBS = "frappe_pgpool.testing.jobs"

ENQUEUE = """
import json
import frappe
from frappe.utils.background_jobs import get_queue
plan = json.load(open({plan!r}))
ids = []
current = None
for site, method, kwargs, timeout in plan:
    if site != current:
        if current:
            frappe.destroy()
        frappe.init(site=site)
        frappe.set_user("Administrator")
        current = site
    ids.append(frappe.enqueue("{jobs}." + method, queue="{queue}", timeout=timeout, **kwargs).id)
frappe.destroy()
json.dump(ids, open({plan!r}, "w"))
out(len(ids))
"""

COLLECT = """
import json
from rq.job import Job
import frappe
from frappe.utils.background_jobs import get_redis_conn, get_queue
ids = json.load(open({path!r}))
with frappe.init_site():
    conn = get_redis_conn()
    queued = get_queue("{queue}").count
rows = []
for start in range(0, len(ids), 500):
    for job in Job.fetch_many(ids[start:start + 500], connection=conn):
        if job is None:
            rows.append(None)
            continue
        value = job.return_value() if job.get_status() == "finished" else None
        rows.append({{
            "status": job.get_status(),
            "enqueued": job.enqueued_at.timestamp() if job.enqueued_at else None,
            "started": job.started_at.timestamp() if job.started_at else None,
            "ended": job.ended_at.timestamp() if job.ended_at else None,
            "pid": (value or {{}}).get("pid"),
            "rss": (value or {{}}).get("rss"),
            "run": (value or {{}}).get("run"),
        }})
json.dump({{"rows": rows, "queued": queued}}, open({path!r}, "w"))
out(len(rows))
"""

EMPTY = """
import frappe
from frappe.utils.background_jobs import get_queue
with frappe.init_site():
    get_queue("{queue}").empty()
out(0)
"""

RQ_VERSION = """
import rq
out(rq.__version__)
"""


def enqueue(plan: list[list]) -> list[str]:
	with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
		json.dump(plan, f)
	try:
		run_in_bench(ENQUEUE.format(plan=f.name, jobs=JOBS, queue=QUEUE), timeout=3600)
		return json.loads(Path(f.name).read_text())
	finally:
		os.unlink(f.name)


def collect(ids: list[str]) -> tuple[list[dict | None], int]:
	with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
		json.dump(ids, f)
	try:
		run_in_bench(COLLECT.format(path=f.name, queue=QUEUE), timeout=3600)
		data = json.loads(Path(f.name).read_text())
		return data["rows"], data["queued"]
	finally:
		os.unlink(f.name)


def worker_command(shape: str, budget: int | None, *extra: str) -> list[str]:
	base = [str(Path(BENCH, "env", "bin", "python")), "-m", "frappe.utils.bench_helper", "frappe"]
	if shape == "fork":
		return [*base, "worker", "--queue", QUEUE, "--burst", "--quiet", *extra]
	budget_args = ["--process-budget", str(budget)] if budget else []
	if "--max-jobs" not in extra:
		extra = ("--respawn", *extra)  # recycled as in production (a burst worker would stop at max-jobs)
	return [
		*base,
		"pgpool",
		"worker",
		"--queue",
		QUEUE,
		"--burst",
		"--quiet",
		"--no-scheduler",
		*budget_args,
		*extra,
	]


def run_workers(commands: list[list[str]]) -> tuple[float, float, list[int]]:
	"""Start the worker processes together, wait for all; (start, end) unix times and exit codes."""
	start = time.time()
	procs = [
		subprocess.Popen(
			c, cwd=Path(BENCH, "sites"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
		)
		for c in commands
	]
	codes = []
	for proc in procs:
		_, err = proc.communicate(timeout=7200)
		if proc.returncode:
			print(err[-2000:], file=sys.stderr)
		codes.append(proc.returncode)
	return start, time.time(), codes


def pct(values: list[float], q: float) -> float:
	values = sorted(values)
	if not values:
		return float("nan")
	return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def count_rows(quick, tag: str) -> dict[str, tuple[int, int]]:
	"""Per site: (rows, distinct descriptions) of this run's tag."""
	pg = upstream()
	counts = {}
	for q in quick:
		conn = pg.connect(q.db_name)
		try:
			with conn.cursor() as cur:
				cur.execute(
					'SELECT count(*), count(DISTINCT description) FROM "tabToDo" WHERE description LIKE %s',
					(tag + ":%",),
				)
				counts[q.name] = cur.fetchone()
		finally:
			conn.close()
	return counts


def throughput_row(name, shape, budget, quick, bouncer, args) -> dict:
	names = [q.name for q in quick]
	dbs = {q.db_name for q in quick}
	tag = f"{name.replace(' ', '-')}-{uuid.uuid4().hex[:6]}"
	run_in_bench(EMPTY.format(queue=QUEUE))
	plan = [[names[i % len(names)], "insert_and_read", {"tag": tag, "n": i}, None] for i in range(args.jobs)]
	ids = enqueue(plan)
	logins0, sessions0 = logins(bouncer, dbs), backend_sessions(dbs)
	start, end, codes = run_workers([worker_command(shape, budget) for _ in range(args.workers)])
	time.sleep(0.5)  # pgBouncer writes its log lines of the last disconnections
	logins1, sessions1 = logins(bouncer, dbs), backend_sessions(dbs)
	clients, servers = timeline_peaks(connection_timeline(bouncer, dbs), start, end)
	rows, queued = collect(ids)
	done = [r for r in rows if r and r["status"] == "finished"]
	counts = count_rows(quick, tag)
	expected = {n: sum(1 for i in range(args.jobs) if names[i % len(names)] == n) for n in names}
	lost = max(0, sum(max(0, expected[n] - counts[n][1]) for n in names) - queued)
	duplicated = sum(counts[n][0] - counts[n][1] for n in names)
	first_start = min(r["started"] for r in done)
	last_end = max(r["ended"] for r in done)
	rss = [r["rss"] for r in done if r["rss"]]
	row = {
		"row": name,
		"workers": args.workers,
		"jobs": args.jobs,
		"sites": len(names),
		"exit_codes": codes,
		"finished": len(done),
		"other_status": {
			s: sum(1 for r in rows if r and r["status"] == s) for s in {r["status"] for r in rows if r}
		}
		| {"missing": sum(1 for r in rows if r is None), "still_queued": queued},
		"jobs_per_s_from_start": round(len(done) / (last_end - start), 1),
		"jobs_per_s_first_to_last": round(len(done) / (last_end - first_start), 1),
		"latency_ms": {
			"enqueue_to_end_p50": round(1000 * pct([r["ended"] - r["enqueued"] for r in done], 50)),
			"enqueue_to_end_p95": round(1000 * pct([r["ended"] - r["enqueued"] for r in done], 95)),
			"start_to_end_p50": round(1000 * pct([r["ended"] - r["started"] for r in done], 50), 1),
			"start_to_end_p95": round(1000 * pct([r["ended"] - r["started"] for r in done], 95), 1),
		},
		"logins": logins1 - logins0,
		"postgres_sessions": sessions1 - sessions0,
		"peak_clients": clients,
		"peak_servers": servers,
		"job_processes": len({r["pid"] for r in done}),
		"rss_mb_first_last": [round(rss[0] / 2**20, 1), round(rss[-1] / 2**20, 1)] if rss else None,
		"rows": sum(c[0] for c in counts.values()),
		"lost": lost,
		"not_run": queued,
		"duplicated": duplicated,
		"wall_s": round(end - start, 1),
	}
	print(json.dumps(row), flush=True)
	return row


def timeout_row(name, shape, budget, quick, bouncer) -> dict:
	"""One worker: a job stuck in pg_sleep(600) with a 2 s timeout, then 20 short jobs."""
	names = [q.name for q in quick]
	dbs = {q.db_name for q in quick}
	tag = f"to-{name.replace(' ', '-')}-{uuid.uuid4().hex[:6]}"
	run_in_bench(EMPTY.format(queue=QUEUE))
	plan = [[names[0], "sleep_in_query", {"seconds": 600}, 2]]
	plan += [[names[i % len(names)], "insert_and_read", {"tag": tag, "n": i}, None] for i in range(20)]
	ids = enqueue(plan)
	start, end, codes = run_workers([worker_command(shape, budget)])
	rows, _ = collect(ids)
	pg = upstream()
	activity = pg.query(
		"SELECT state, query FROM pg_stat_activity WHERE datname = ANY(%s) AND backend_type = 'client backend'",
		(sorted(dbs),),
	)
	in_tx = sum(1 for state, _ in activity if state and state.startswith("idle in transaction"))
	sleeping = sum(1 for state, query in activity if state == "active" and "pg_sleep" in (query or ""))
	# clean up what plain Frappe leaves: a backend still sleeping after its client was killed
	pg.query(
		"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = ANY(%s) AND query LIKE %s",
		(sorted(dbs), "%pg_sleep%"),
	)
	stuck = rows[0]
	row = {
		"row": name,
		"timeout_job_status": stuck["status"] if stuck else None,
		"worker_held_s": round(stuck["ended"] - stuck["started"], 1) if stuck and stuck["ended"] else None,
		"open_transactions_after": in_tx,
		"sleeps_still_running_after": sleeping,
		"jobs_after_finished": sum(1 for r in rows[1:] if r and r["status"] == "finished"),
		"exit_code": codes[0],
		"wall_s": round(end - start, 1),
	}
	print(json.dumps(row), flush=True)
	return row


def rss_row(name, extra: list[str], budget, quick, args) -> dict:
	names = [q.name for q in quick]
	tag = f"rss-{uuid.uuid4().hex[:6]}"
	run_in_bench(EMPTY.format(queue=QUEUE))
	plan = [
		[names[i % len(names)], "insert_and_read", {"tag": tag, "n": i}, None] for i in range(args.rss_jobs)
	]
	ids = enqueue(plan)
	start, end, codes = run_workers([worker_command("no-fork", budget, *extra)])
	rows, queued = collect(ids)
	done = [r for r in rows if r and r["status"] == "finished"]
	by_ended = sorted(done, key=lambda r: r["ended"])
	marks = {1: by_ended[0]["rss"]}
	for k in range(1000, len(by_ended) + 1, 1000):
		marks[k] = by_ended[k - 1]["rss"]
	row = {
		"row": name,
		"jobs": args.rss_jobs,
		"finished": len(done),
		"still_queued": queued,
		"rss_mb_after_job": {k: round(v / 2**20, 1) for k, v in marks.items()},
		"rss_mb_max": round(max(r["rss"] for r in done) / 2**20, 1),
		"exit_code": codes[0],
		"wall_s": round(end - start, 1),
	}
	print(json.dumps(row), flush=True)
	return row


def render(data: dict) -> str:
	lines = [
		"# Background jobs: forking `bench worker` vs `bench pgpool worker`",
		"",
		data["provenance"],
		"",
		f"rq {data['rq']}; pgBouncer in session mode, SCRAM. Load average (1/5/15 min) at the end: "
		f"{data['load_at_end']} (the start's is in the line above).",
		"",
		f"{data['args']['jobs']} short jobs (insert a ToDo, read it back) round-robin over "
		f"{data['args']['sites']} quick sites, enqueued ahead on queue `short`, {data['args']['workers']} worker "
		"processes in burst mode. Latency enqueue-to-end is mostly the wait in the queue (every job is "
		"enqueued before the workers start); start-to-end is rq's own stamps, which for the forking worker "
		"exclude the fork. jobs/s from start includes the workers' start-up.",
		"",
		"| row | jobs/s (from start) | jobs/s (first to last job) | enqueue-to-end p50 / p95 ms | start-to-end p50 / p95 ms "
		"| logins | PG sessions | peak clients | peak servers | job processes | rows | lost | duplicated | not run | statuses |",
		"|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
	]
	for r in data["throughput"]:
		lat = r["latency_ms"]
		statuses = ", ".join(f"{k} {n}" for k, n in sorted(r["other_status"].items()) if n)
		lines.append(
			f"| {r['row']} | {r['jobs_per_s_from_start']} | {r['jobs_per_s_first_to_last']} | "
			f"{lat['enqueue_to_end_p50']} / {lat['enqueue_to_end_p95']} | {lat['start_to_end_p50']} / "
			f"{lat['start_to_end_p95']} | {r['logins']} | {r['postgres_sessions']} | {r['peak_clients']} | "
			f"{r['peak_servers']} | {r['job_processes']} | {r['rows']} | {r['lost']} | {r['duplicated']} | {r.get('not_run', 0)} | {statuses} |"
		)
	base = data["throughput"][0] if data["throughput"] else {}
	for r in data["throughput"][1:] if base.get("row", "").startswith("fork") else []:
		lines.append("")
		lines.append(
			f"{r['row']} / {base['row']}: jobs/s x{r['jobs_per_s_from_start'] / base['jobs_per_s_from_start']:.2f} "
			f"(from start), x{r['jobs_per_s_first_to_last'] / base['jobs_per_s_first_to_last']:.2f} (first to "
			f"last job); logins {r['logins']} vs {base['logins']}."
		)
	lines += [
		"",
		"## A job past its timeout (one worker: `SELECT pg_sleep(600)` with a 2 s timeout, then 20 short jobs)",
		"",
		"| row | timeout job | worker held (s) | open transactions after | sleeps still running after | jobs after it finished |",
		"|---|---|---|---|---|---|",
	]
	for r in data["timeout"]:
		lines.append(
			f"| {r['row']} | {r['timeout_job_status']} | {r['worker_held_s']} | {r['open_transactions_after']} | "
			f"{r['sleeps_still_running_after']} | {r['jobs_after_finished']} / 20 |"
		)
	lines += [
		"",
		"The forking worker's parent kills a horse 60 s after its job's timeout when the horse cannot act on "
		"it (blocked in a query); the backend then goes on sleeping, its client gone (the benchmark "
		"terminates it afterwards). The no-fork worker cancels the query.",
		"",
	]
	if not data["rss"]:
		lines += [
			"## Memory",
			"",
			"Not measured in this run (`--rss-jobs 0`): one no-fork worker over 10,000 jobs, on 4b3b691, is in "
			"`jobs-4b3b691.md`.",
			"",
		]
		return "\n".join(lines)
	lines += [
		f"## Memory: one no-fork worker, {data['args']['rss_jobs']} jobs over the same sites",
		"",
		"| row | RSS MB after job 1 | after each 1000th | max | finished |",
		"|---|---|---|---|---|",
	]
	for r in data["rss"]:
		marks = r["rss_mb_after_job"]
		steps = ", ".join(f"{k}: {v}" for k, v in marks.items() if k != "1")
		lines.append(
			f"| {r['row']} | {marks.get('1', marks.get(1))} | {steps} | {r['rss_mb_max']} | {r['finished']} |"
		)
	lines.append("")
	return "\n".join(lines)


def main() -> int:
	parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
	parser.add_argument("--sites", type=int, default=20)
	parser.add_argument("--jobs", type=int, default=2000)
	parser.add_argument("--workers", type=int, default=2)
	parser.add_argument("--rss-jobs", type=int, default=10000)
	parser.add_argument("--skip-timeout", action="store_true")
	parser.add_argument(
		"--skip-fork", action="store_true", help="no forking bench worker rows (its jobs/s is slow)"
	)
	parser.add_argument("--keep-sites", action="store_true")
	parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
	args = parser.parse_args()
	problem = bench_problem()
	if problem:
		print(problem, file=sys.stderr)
		return 2
	(rq_version,) = run_in_bench(RQ_VERSION)
	names = [f"jobs{i:02d}.local" for i in range(1, args.sites + 1)]
	# job results kept 2 h (Frappe's default, 10 min, is shorter than a forking run: their timestamps would expire)
	quick = make_quick_sites(BENCH, SITE, names, config={"rq_results_ttl": 7200})
	data = {
		"provenance": "",  # once pgBouncer runs
		"rq": rq_version,
		"args": {"sites": args.sites, "jobs": args.jobs, "workers": args.workers, "rss_jobs": args.rss_jobs},
		"throughput": [],
		"timeout": [],
		"rss": [],
	}
	fork, auto, budgeted = (
		("fork (bench worker)", "fork", None),
		("no-fork, budget auto", "no-fork", None),
		(f"no-fork, --process-budget {args.sites}", "no-fork", args.sites),
	)
	shapes = [auto, budgeted] if args.skip_fork else [fork, auto, budgeted]
	try:
		with configs_restored(names):
			bouncer = start_bouncer(quick, "session", default_pool_size=args.sites * args.workers + 5)
			point_at(names, bouncer.host, bouncer.port)
			try:
				data["provenance"] = provenance(
					postgres=upstream().connect, pgbouncer=bouncer.admin, bench=BENCH
				)
				print(data["provenance"], flush=True)
				for name, shape, budget in shapes:
					data["throughput"].append(throughput_row(name, shape, budget, quick, bouncer, args))
				if not args.skip_timeout:
					for name, shape, budget in [s for s in (fork, budgeted) if s in shapes]:
						data["timeout"].append(timeout_row(name, shape, budget, quick, bouncer))
				if args.rss_jobs:
					data["rss"].append(
						rss_row(
							"recycling off (--max-jobs 0 --max-memory 0)",
							["--max-jobs", "0", "--max-memory", "0"],
							args.sites,
							quick,
							args,
						)
					)
					data["rss"].append(
						rss_row(
							"defaults + --respawn (max-jobs 1000 +-10%)",
							["--respawn"],
							args.sites,
							quick,
							args,
						)
					)
			finally:
				bouncer.__exit__(None, None, None)
	finally:
		if not args.keep_sites:
			remove_quick_sites(BENCH, names)
	data["load_at_end"] = load_average()
	args.out.mkdir(parents=True, exist_ok=True)
	(args.out / "jobs.json").write_text(json.dumps(data, indent=1, default=str))
	(args.out / "jobs.md").write_text(render(json.loads(json.dumps(data, default=str))))
	print((args.out / "jobs.md").read_text())
	return 0


if __name__ == "__main__":
	sys.exit(main())
