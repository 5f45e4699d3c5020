"""benchmarks/provenance.py and benchmarks/check_results.py: the line a report starts with, and how the
checker reads figures out of prose and matches them against a results file."""

from __future__ import annotations

import re
from decimal import Decimal

from benchmarks import check_results
from benchmarks.provenance import code_version, provenance


def test_provenance_names_what_ran(cluster, bouncer):
	line = provenance(postgres=cluster.connect, pgbouncer=bouncer.admin)
	assert line.startswith("Ran on: frappe_pgpool ")
	commit = check_results.COMMIT.search(line).group(1)
	assert code_version().startswith(commit)
	server = cluster.execute("SHOW server_version")[0]["server_version"].split()[0]
	assert f"PostgreSQL {server}" in line
	assert re.search(r"PgBouncer \d+\.\d+", line)
	assert re.search(r"\d+ CPUs, load [\d.]+ [\d.]+ [\d.]+; \d{4}-\d\d-\d\d \d\d:\d\d UTC", line)
	assert "\n" not in line


def figures(text: str) -> list[str]:
	return [f.text for f in check_results.doc_figures(text)]


def test_figures_in_prose():
	assert figures("p95 x0.36, 2.9x, 1,720 jobs, 87% hits, 2.4 ms, (x17)") == [
		"x0.36",
		"2.9x",
		"1,720",
		"87%",
		"2.4",
		"x17",
	]
	# words with digits, versions, commits, inline code and the cited file names are not figures
	assert figures("e2e p50 pgBouncer 1.18.0 on cd2fc45: `--rounds 8` sites-tx100.md") == []


def occurs(figure: str, text: str) -> bool:
	(found,) = check_results.doc_figures(figure)
	return check_results.occurs(found, check_results.file_values(text))


def test_figures_match_the_file_as_rounded():
	assert occurs("2.9x", "req/s 2.92")
	assert occurs("x2.0", "req/s 2.03")
	assert occurs("220,283", "requests: 220283")
	assert occurs("87%", "hit rate 0.87")
	assert occurs("2.40", "2.4 ms")
	assert not occurs("2.9x", "req/s 2.96")
	assert not occurs("3.0", "30.0")
	assert not occurs("2.92", "2.9")  # more precise than the file
	assert check_results.occurs(
		check_results.Figure("15", Decimal(15), 0, False), check_results.file_values("PostgreSQL 15.20")
	)


def test_passages_group_wrapped_lines_and_lists():
	lines = [
		"Intro citing e2e.md:",
		"",
		"| a | b |",
		"|---|---|",
		"- item one",
		"  continued",
		"- item two",
		"```",
		"code 1",
		"```",
		"Paragraph",
		"wrapped",
	]
	assert check_results.passages(lines) == [[0], [2, 3], [4, 5], [6], [10, 11]]
