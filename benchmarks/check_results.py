"""Check that the published benchmark figures are traceable and quoted as measured.

    python benchmarks/check_results.py [--passages]

Exits 1 and prints file:line for each of:

(a) a benchmarks/results/*.md without a line naming the frappe_pgpool commit it ran on
    ("frappe_pgpool <hash>", as benchmarks/provenance.py writes it) that `git rev-list --all` holds;
(b) a number on a line of README.md or docs/*.md that cites a results file (`benchmarks/results/e2e.md`,
    `e2e.md`, `e2e.png`: a .png or .json stands for the .md of the same name) and does not occur in that
    file. Formats are normalised: 1,720 = 1720; x0.36 = 0.36x = 0.36; a figure quoted with fewer decimals
    matches the file's value rounded (2.9 matches 2.92); 87% matches 87 or 0.87. Not checked: inline code
    (`--rounds 8`), version numbers (1.18.0), words with digits (p95, e2e, commit hashes).
    `<!-- check_results: ignore -->` on a line skips it; `<!-- check_results: ignore 8 95 -->` skips
    those numbers only. For numbers that are not measurements; use sparingly.

--passages widens (b) from the citing line to its paragraph or list item, and to a table right after a
paragraph ending in ":" that cites a file (figures wrapped onto the next line, or tabled below).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COMMIT = re.compile(r"frappe_pgpool\s+([0-9a-f]{7,40})\b")
CITE = re.compile(r"(?<![\w/.-])(?:benchmarks/results/)?([\w.-]+\.(?:md|json|png|txt))\b")
IGNORE = re.compile(r"<!--\s*check_results:\s*ignore\b([^>]*?)-->")
# a figure in prose: optional x, digits (1,720 or 1720), decimals, then x or % or nothing glued on;
# not part of a word (p95, e2e) nor of a version (1.18.0)
DOC_NUMBER = re.compile(r"(?<![\w.])(x|\u00d7)?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(x|\u00d7|%)?(?!\w|\.\d|,\d)")
FILE_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
CODE = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
COMMENT = re.compile(r"<!--.*?-->")


@dataclass(frozen=True)
class Figure:
	text: str
	value: Decimal
	decimals: int
	percent: bool


def doc_figures(line: str) -> list[Figure]:
	line = COMMENT.sub(" ", LINK_TARGET.sub("]", CODE.sub(" ", line)))
	line = CITE.sub(" ", line)  # the file names themselves (sites-tx100.md)
	figures = []
	for m in DOC_NUMBER.finditer(line):
		whole, frac = m.group(2).replace(",", ""), m.group(3) or ""
		figures.append(Figure(m.group(0), Decimal(whole + frac), max(0, len(frac) - 1), m.group(4) == "%"))
	return figures


def file_values(text: str) -> list[tuple[Decimal, int]]:
	values = []
	for m in FILE_NUMBER.finditer(text):
		frac = m.group(2) or ""
		values.append((Decimal(m.group(1).replace(",", "") + frac), max(0, len(frac) - 1)))
	return values


def occurs(figure: Figure, values: list[tuple[Decimal, int]]) -> bool:
	wanted = [(figure.value, figure.decimals)]
	if figure.percent:  # 87% may be written 0.87 in the file
		wanted.append((figure.value / 100, figure.decimals + 2))
	for value, decimals in wanted:
		step = Decimal(1).scaleb(-decimals)
		for found, found_decimals in values:
			if found == value:
				return True
			if found_decimals > decimals and any(
				found.quantize(step, rounding=r) == value for r in (ROUND_HALF_UP, ROUND_HALF_EVEN)
			):
				return True
	return False


def known_commits() -> set[str]:
	result = subprocess.run(
		["git", "-C", str(ROOT), "rev-list", "--all"], capture_output=True, text=True, check=True
	)
	return set(result.stdout.split())


def check_provenance(problems: list[str], notes: list[str]) -> None:
	commits = known_commits()
	for path in sorted(RESULTS.glob("*.md")):
		lines = path.read_text().splitlines()
		found = [(n, m.group(1)) for n, line in enumerate(lines, 1) for m in COMMIT.finditer(line)]
		rel = path.relative_to(ROOT)
		if not found:
			problems.append(f"{rel}:1: no provenance line (frappe_pgpool <commit>)")
			continue
		n, commit = found[0]
		if not any(c.startswith(commit) for c in commits):
			problems.append(f"{rel}:{n}: commit {commit} is not in `git rev-list --all`")
		elif not any(line.startswith("Ran on:") for line in lines):
			notes.append(f"{rel}:{n}: names commit {commit}, but not the full provenance (no 'Ran on:' line)")


def cited(line: str, beside: Path | None = None) -> list[str]:
	"""The results files a doc line cites; a bare name that is also a file `beside` the doc (docs/jobs.md
	next to results/jobs.md) is that file, unless written with benchmarks/results/."""
	names = []
	for m in CITE.finditer(line):
		name = m.group(1)
		if not (RESULTS / name).exists():
			continue
		if beside is not None and "results/" not in m.group(0) and (beside / name).exists():
			continue
		md = name if name.endswith((".md", ".txt")) else name.rsplit(".", 1)[0] + ".md"
		if (RESULTS / md).exists() and md not in names:
			names.append(md)
	return names


def passages(lines: list[str]) -> list[list[int]]:
	"""Line indexes grouped into paragraphs, list items and tables (fenced code left out)."""
	groups: list[list[int]] = []
	current: list[int] = []
	fenced = False

	def close() -> None:
		nonlocal current
		if current:
			groups.append(current)
		current = []

	for i, line in enumerate(lines):
		stripped = line.strip()
		if stripped.startswith("```"):
			close()
			fenced = not fenced
			continue
		if fenced:
			continue
		if not stripped:
			close()
			continue
		is_table = stripped.startswith("|")
		if (
			stripped.startswith("#")
			or re.match(r"([-*+]|\d+\.)\s", stripped)
			or (current and is_table != lines[current[-1]].strip().startswith("|"))
		):
			close()
		current.append(i)
	close()
	return groups


def check_docs(problems: list[str], wide: bool) -> int:
	docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
	cache: dict[str, list[tuple[Decimal, int]]] = {}
	checked = 0

	def values(name: str) -> list[tuple[Decimal, int]]:
		if name not in cache:
			cache[name] = file_values((RESULTS / name).read_text())
		return cache[name]

	for doc in docs:
		if not doc.exists():
			continue
		lines = doc.read_text().splitlines()
		scope: dict[int, list[str]] = {}
		if wide:
			previous: tuple[list[int], list[str]] | None = None
			for group in passages(lines):
				names = [n for i in group for n in cited(lines[i], doc.parent)]
				is_table = lines[group[0]].strip().startswith("|")
				if (
					not names
					and is_table
					and previous
					and previous[1]
					and previous[0][-1] == group[0] - 2
					and lines[previous[0][-1]].rstrip().endswith(":")
				):
					names = previous[1]
				for i in group:
					scope[i] = list(dict.fromkeys(names))
				previous = (group, names)
		else:
			scope = {i: cited(line, doc.parent) for i, line in enumerate(lines)}
		for i, names in scope.items():
			line = lines[i]
			if not names:
				continue
			marker = IGNORE.search(line)
			if marker and not marker.group(1).strip():
				continue
			skip = set(marker.group(1).split()) if marker else set()
			checked += 1
			for figure in doc_figures(line):
				if figure.text.strip("x\u00d7%") in skip or figure.text in skip:
					continue
				if not any(occurs(figure, values(name)) for name in names):
					problems.append(
						f"{doc.relative_to(ROOT)}:{i + 1}: {figure.text} is not in {', '.join(names)}"
					)
	return checked


def main() -> int:
	parser = argparse.ArgumentParser(
		description=__doc__.split("\n")[0],
		epilog=__doc__,
		formatter_class=argparse.RawDescriptionHelpFormatter,
	)
	parser.add_argument("--passages", action="store_true", help="check whole passages that cite a file")
	args = parser.parse_args()
	problems: list[str] = []
	notes: list[str] = []
	check_provenance(problems, notes)
	checked = check_docs(problems, args.passages)
	for line in problems:
		print(line)
	for line in notes:
		print(f"note: {line}")
	print(
		f"check_results: {len(problems)} problem(s); {len(list(RESULTS.glob('*.md')))} results files, "
		f"{checked} citing doc lines checked{' (passages)' if args.passages else ''}",
		file=sys.stderr,
	)
	return 1 if problems else 0


if __name__ == "__main__":
	raise SystemExit(main())
