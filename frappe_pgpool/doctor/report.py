"""The findings as the operator reads them."""

from __future__ import annotations

from .model import Finding


def render(findings: list[Finding]) -> str:
	marks = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR"}
	lines = []
	for f in findings:
		lines.append(f"{marks[f.level]} {f.check}: {f.message}")
		if f.fix:
			lines.append(f"      fix: {f.fix}")
	errors = sum(f.level == "error" for f in findings)
	warnings = sum(f.level == "warn" for f in findings)
	lines.append(f"{errors} errors, {warnings} warnings")
	return "\n".join(lines)
