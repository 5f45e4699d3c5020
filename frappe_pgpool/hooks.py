app_name = "frappe_pgpool"
app_title = "Frappe Pgpool"
app_publisher = "frappe_pgpool developers"
app_description = "Client-side PostgreSQL connection pool: one pgBouncer login per worker, not per request"
app_email = "frappe-pgpool@example.invalid"
app_license = "MIT"

after_install = "frappe_pgpool.install.after_install"
before_uninstall = "frappe_pgpool.install.before_uninstall"
