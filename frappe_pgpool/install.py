"""install-app / uninstall-app hooks: switch the pool on and off for one site."""

from __future__ import annotations

import json
import os

import frappe
from frappe.installer import update_site_config

from .bootstrap import write_pth


def after_install() -> None:
	update_site_config("db_pool_enabled", 1)
	path = write_pth()
	where = (
		f"it loads from {path}"
		if path
		else "the .pth could not be written; it loads when the app is imported"
	)
	print(f"frappe_pgpool: pool enabled for {frappe.local.site} ({where}).")
	print("frappe_pgpool: restart the bench processes (bench restart) so running workers load the patch.")


def before_uninstall() -> None:
	# The patch may stay loaded in running processes; it does nothing for a site without db_pool_enabled.
	update_site_config("db_pool_enabled", "None")  # "None" removes the key
	common = os.path.join(frappe.local.sites_path, "common_site_config.json")
	if os.path.exists(common):
		with open(common) as f:
			if json.load(f).get("db_pool_enabled"):
				print("frappe_pgpool: common_site_config.json still sets db_pool_enabled for every site.")
