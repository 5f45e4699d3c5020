app_name = "frappe_pgpool"
app_title = "Frappe Pgpool"
app_publisher = "frappe_pgpool developers"
app_description = "Client-side PostgreSQL connection pool: one pgBouncer login per worker, not per request"
app_email = "frappe-pgpool@example.invalid"
app_license = "MIT"

after_install = "frappe_pgpool.install.after_install"
before_uninstall = "frappe_pgpool.install.before_uninstall"
after_migrate = ["frappe_pgpool.install.after_migrate"]

# The fallback for a process that the package's .pth did not arm at start (see arming.py).
before_request = ["frappe_pgpool.arming.before_request"]
before_job = ["frappe_pgpool.arming.before_job"]
