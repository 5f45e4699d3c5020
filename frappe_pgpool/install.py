"""install-app / uninstall-app / migrate hooks: switch the pool on and off for one site.

Arming is not their business: the package install put frappe_pgpool_arm.pth in site-packages (see
bootstrap), so nothing is written there at run time. They only tidy up after older versions, whose
install-app wrote frappe_pgpool_autoload.pth, and say so when this environment is not armed.
"""

from __future__ import annotations

import json
import os

import frappe
from frappe.installer import update_site_config

from . import bootstrap


def after_install() -> None:
	update_site_config("db_pool_enabled", 1)
	print(f"frappe_pgpool: pool enabled for {frappe.local.site}.")
	_check_environment()
	print("frappe_pgpool: restart the bench processes (bench restart) so running workers load the patch.")


def after_migrate() -> None:
	_check_environment()


def _check_environment() -> None:
	for path in bootstrap.remove_legacy_pth():
		print(f"frappe_pgpool: removed {path} (written by an older install-app; the package arms now).")
	if bootstrap.shipped_pth() is None:
		print(
			f"frappe_pgpool: WARNING: {bootstrap.PTH_NAME} is not in this Python environment "
			f"({', '.join(bootstrap.site_dirs())}): its processes are armed late, by the request and job "
			"hooks, and each one's first request goes unpooled. Install the app into the environment with "
			"pip or uv (bench get-app, bench setup requirements)."
		)


def before_uninstall() -> None:
	# The patch may stay loaded in running processes; it does nothing for a site without db_pool_enabled.
	update_site_config("db_pool_enabled", "None")  # "None" removes the key
	common = os.path.join(frappe.local.sites_path, "common_site_config.json")
	if os.path.exists(common):
		with open(common) as f:
			if json.load(f).get("db_pool_enabled"):
				print("frappe_pgpool: common_site_config.json still sets db_pool_enabled for every site.")
