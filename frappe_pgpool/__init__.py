__version__ = "0.1.0"

# Whatever imports the app (hooks, bench commands, Frappe's module map) also arms the patch;
# the .pth file written at install time arms it earlier still, at interpreter start.
from .bootstrap import arm

arm()
