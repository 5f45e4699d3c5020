"""The harness's readers fail the test when they cannot read: never a 0 or an empty result that would
let an upper bound ("at most N logins", "nothing sent") pass without measuring anything."""

from __future__ import annotations

import pytest


def test_an_unreadable_pgbouncer_log_fails_the_reader(bouncer, monkeypatch):
	assert bouncer.logins("app1") >= 0  # readable: a count
	monkeypatch.setattr(bouncer, "log", bouncer.log.with_name("no-such-pgbouncer.log"))
	with pytest.raises(AssertionError, match="cannot read pgBouncer's log"):
		bouncer.logins("app1")
	with pytest.raises(AssertionError, match="cannot read pgBouncer's log"):
		bouncer.server_connections_opened("app1")


def test_stats_of_a_database_pgbouncer_does_not_list_fails(bouncer):
	with pytest.raises(AssertionError, match="lists no database 'no_such_db'"):
		bouncer.stats("no_such_db")
	assert bouncer.stats("no_such_db", missing_ok=True) is None


def test_the_many_sites_readers_fail_when_they_cannot_read(bouncer, monkeypatch):
	from .frappe.sites import connection_timeline, logins, tcp_connections

	monkeypatch.setattr(bouncer, "log", bouncer.log.with_name("no-such-pgbouncer.log"))
	with pytest.raises(AssertionError, match="cannot read pgBouncer's log"):
		logins(bouncer, {"app1"})
	with pytest.raises(AssertionError, match="cannot read pgBouncer's log"):
		connection_timeline(bouncer, {"app1"})
	with pytest.raises(AssertionError, match="cannot read the sockets of process"):
		tcp_connections({2**22 + 1}, bouncer.port)  # above pid_max's default: no such process


def test_a_sampler_peak_over_lost_samples_fails():
	from .frappe.sites import Sampler

	sampler = Sampler({"app1"})
	with pytest.raises(AssertionError, match="took no sample"):
		sampler.peak_by_pid("sockets_by_pid")
	sampler.samples.append({"t": 0.0, "backends": 1})
	assert sampler.peak("backends") == 1
	with pytest.raises(AssertionError, match="no 'sockets_by_pid'"):
		sampler.peak_by_pid("sockets_by_pid")
	sampler.errors.append("OperationalError('connection refused')")
	with pytest.raises(AssertionError, match="lost 1 sample"):
		sampler.peak("backends")
