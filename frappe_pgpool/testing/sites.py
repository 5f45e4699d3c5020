"""Quick sites for a real Frappe bench: copies of an existing site's database, made in seconds.

    make_quick_sites(bench, "site1.local", ["q01.local", "q02.local"])            # own DB and user each
    make_quick_sites(bench, "site1.local", ["s1.local", "s2.local"], shared="grp")  # one DB and user for all
    remove_quick_sites(bench)                                                     # every quick site, DBs, roles

A quick site is a folder sites/<name>/ with a site_config.json (db_name, db_user, db_password,
db_type, db_host, db_port, db_pool_enabled 1, the template's encryption_key) and a database made
with `CREATE DATABASE ... TEMPLATE <template site's db>`, so it has the template's installed apps
(frappe_pgpool among them), users and API keys. In Frappe 15 a site's database user is its db_name:
each quick database gets a role of that name, with a password, owning the database and every object
in it (REASSIGN OWNED from the template's role, in the copy only). In the shared shape several sites
name one such database.

Idempotent (an existing quick site is kept, its config refreshed) and removable: the folder carries
a marker file naming what was created, and remove_quick_sites drops exactly that. No Frappe import;
talks to PostgreSQL as a superuser (PGPOOL_PG_HOST, PGPOOL_PG_PORT, PGPOOL_PG_SUPERUSER, default
127.0.0.1:5432 postgres). The template database must have no other connection while it is copied:
its connections are terminated (retrying while clients reconnect), so copy before starting workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.errors
from psycopg2 import sql

MARKER = ".pgpool-quick-site"
DB_PREFIX = "_pgpq_"  # every database and role made here starts with this; nothing else is ever dropped


@dataclass(frozen=True)
class QuickSite:
	name: str
	db_name: str  # also the database user (Frappe 15 logs in as db_name)
	db_password: str = ""

	@property
	def user(self) -> str:
		return self.db_name


def _server() -> dict:
	return {
		"host": os.environ.get("PGPOOL_PG_HOST", "127.0.0.1"),
		"port": int(os.environ.get("PGPOOL_PG_PORT", "5432")),
		"user": os.environ.get("PGPOOL_PG_SUPERUSER", os.environ.get("PGPOOL_E2E_PG_SUPERUSER", "postgres")),
	}


def _connect(dbname: str = "postgres", autocommit: bool = True):
	conn = psycopg2.connect(dbname=dbname, **_server())
	conn.autocommit = autocommit
	return conn


def _slug(name: str) -> str:
	return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40]


def db_name_for(bench: Path | str, site: str) -> str:
	"""The database (and role) of a quick site, or of a shared group: stable, unique per bench.

	The bench's path takes part, so benches sharing one PostgreSQL never share a quick database.
	"""
	digest = hashlib.sha256(f"{Path(bench).resolve()}\0{site}".encode()).hexdigest()[:8]
	return f"{DB_PREFIX}{_slug(site)[:30]}_{digest}"


def _comment(bench: Path | str) -> str:
	return f"frappe_pgpool quick site of bench {Path(bench).resolve()}"


def _password(db_name: str) -> str:
	return hashlib.sha256(f"pgpool-quick-site:{db_name}:{os.urandom(8).hex()}".encode()).hexdigest()[:24]


def _site_dir(bench: Path | str, site: str) -> Path:
	return Path(bench, "sites", site)


def _read_config(bench: Path | str, site: str) -> dict:
	return json.loads((_site_dir(bench, site) / "site_config.json").read_text())


def _write_json(path: Path, data: dict) -> None:
	tmp = path.with_suffix(".tmp")
	tmp.write_text(json.dumps(data, indent=1))
	os.replace(tmp, path)


def _exists(cur, kind: str, name: str) -> bool:
	table, column = {"role": ("pg_roles", "rolname"), "database": ("pg_database", "datname")}[kind]
	cur.execute(f"SELECT 1 FROM {table} WHERE {column} = %s", (name,))
	return cur.fetchone() is not None


def _copy_database(cur, template: str, target: str, owner: str, attempts: int = 20) -> None:
	"""CREATE DATABASE target TEMPLATE template; the template's connections are cut first."""
	for attempt in range(attempts):
		cur.execute(
			"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
			(template,),
		)
		try:
			cur.execute(
				sql.SQL("CREATE DATABASE {} TEMPLATE {} OWNER {} STRATEGY FILE_COPY").format(
					sql.Identifier(target), sql.Identifier(template), sql.Identifier(owner)
				)
			)
			return
		except psycopg2.errors.ObjectInUse:  # a client reconnected between terminate and copy
			if attempt == attempts - 1:
				raise
			time.sleep(0.1 * (attempt + 1))


def _take_ownership(target: str, template: str, template_role: str, role: str) -> None:
	"""Make `role` own everything in the copy that the template's role owned there.

	REASSIGN OWNED also moves shared objects, the template database itself among them: that is put
	back in the same transaction.
	"""
	with contextlib.closing(_connect(target, autocommit=False)) as conn:
		with conn.cursor() as cur:
			cur.execute(
				sql.SQL("REASSIGN OWNED BY {} TO {}").format(
					sql.Identifier(template_role), sql.Identifier(role)
				)
			)
			cur.execute(
				sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
					sql.Identifier(template), sql.Identifier(template_role)
				)
			)
		conn.commit()


def make_quick_sites(
	bench: Path | str,
	template_site: str,
	names: list[str],
	*,
	shared: str | None = None,
	config: dict | None = None,
) -> list[QuickSite]:
	"""Make (or refresh) quick sites copied from `template_site`; return them in order.

	shared=None: each site gets its own database and role. shared="grp": all `names` share one
	database and role (db_name_for(bench, "grp")). `config` adds keys to each site's site_config.json.
	"""
	template_config = _read_config(bench, template_site)
	template_db = template_config["db_name"]
	server = _server()
	groups: dict[str, list[str]] = {}
	for name in names:
		if name == template_site:
			raise ValueError("a quick site cannot be its own template")
		groups.setdefault(db_name_for(bench, shared) if shared else db_name_for(bench, name), []).append(name)
	sites = []
	with contextlib.closing(_connect()) as conn, conn.cursor() as cur:
		cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (template_db,))
		template_role = cur.fetchone()[0]
		for db_name, members in groups.items():
			password = ""
			for member in members:  # reuse the password an existing quick site already has
				with contextlib.suppress(OSError, ValueError, KeyError):
					if _read_config(bench, member)["db_name"] == db_name:
						password = _read_config(bench, member)["db_password"]
						break
			password = password or _password(db_name)
			verb = "ALTER" if _exists(cur, "role", db_name) else "CREATE"
			cur.execute(
				sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(db_name)), (password,)
			)
			if not _exists(cur, "database", db_name):
				_copy_database(cur, template_db, db_name, db_name)
				_take_ownership(db_name, template_db, template_role, db_name)
				cur.execute(
					sql.SQL("COMMENT ON DATABASE {} IS %s").format(sql.Identifier(db_name)),
					(_comment(bench),),
				)
			for member in members:
				folder = _site_dir(bench, member)
				if folder.exists() and not (folder / MARKER).exists():
					raise RuntimeError(f"{folder} exists and is not a quick site: not touching it")
				for sub in ("private/files", "private/backups", "public/files", "logs", "locks"):
					(folder / sub).mkdir(parents=True, exist_ok=True)
				site_config = {
					"db_name": db_name,
					"db_user": db_name,  # Frappe 15 uses db_name as the user; later versions read db_user
					"db_password": password,
					"db_type": "postgres",
					"db_host": server["host"],
					"db_port": server["port"],
					"db_pool_enabled": 1,
					**(
						{"encryption_key": template_config["encryption_key"]}
						if "encryption_key" in template_config
						else {}
					),
					**(config or {}),
				}
				_write_json(folder / "site_config.json", site_config)
				_write_json(folder / MARKER, {"db_name": db_name, "template": template_site})
				sites.append(QuickSite(member, db_name, password))
	order = {name: i for i, name in enumerate(names)}
	return sorted(sites, key=lambda s: order[s.name])


def quick_sites(bench: Path | str) -> list[str]:
	"""Names of the quick sites in the bench's sites folder."""
	return sorted(p.parent.name for p in Path(bench, "sites").glob(f"*/{MARKER}"))


def remove_quick_sites(bench: Path | str, names: list[str] | None = None) -> list[str]:
	"""Remove quick sites (all when names is None): folders, then databases and roles no site uses.

	Only databases named by a marker file, or (names None) commented as this bench's quick databases
	(left by an interrupted run), and starting with DB_PREFIX are dropped, with their roles; a shared
	database stays while another quick site still names it. Returns the databases dropped.
	"""
	targets = quick_sites(bench) if names is None else [n for n in names if n in quick_sites(bench)]
	candidates = set()
	for name in targets:
		folder = _site_dir(bench, name)
		with contextlib.suppress(OSError, ValueError, KeyError):
			candidates.add(json.loads((folder / MARKER).read_text())["db_name"])
		shutil.rmtree(folder, ignore_errors=True)
	still_used = set()
	for name in quick_sites(bench):
		with contextlib.suppress(OSError, ValueError, KeyError):
			still_used.add(json.loads((_site_dir(bench, name) / MARKER).read_text())["db_name"])
	dropped = []
	with contextlib.closing(_connect()) as conn, conn.cursor() as cur:
		if names is None:
			cur.execute(
				"SELECT datname FROM pg_database WHERE shobj_description(oid, 'pg_database') = %s",
				(_comment(bench),),
			)
			candidates.update(row[0] for row in cur.fetchall())
		for db_name in sorted(candidates - still_used):
			if not db_name.startswith(DB_PREFIX):
				continue
			cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db_name)))
			if _exists(cur, "role", db_name):
				cur.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(db_name)))
			dropped.append(db_name)
	return dropped
