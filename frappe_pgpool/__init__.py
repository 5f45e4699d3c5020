__version__ = "0.2.0"  # each release: a CHANGELOG.md entry saying what changed for an operator

# Imported at interpreter start by the package's frappe_pgpool_arm.pth, and by whatever else
# imports the app (bench commands, hooks): arm() only registers the import trigger, so this
# stays cheap (os and sys only). See bootstrap.
from .bootstrap import arm

arm()
