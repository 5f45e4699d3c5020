__version__ = "0.2.0"  # each release: a CHANGELOG.md entry saying what changed for an operator

# Importing the package does nothing else: arming is the .pth's job at interpreter start
# (frappe_pgpool_arm.pth: bootstrap.arm(pth=True)) and the request/job hooks' as a late fallback
# (arming.py), so that the engine (frappe_pgpool.pool), doctor and the tests import without side effects.
