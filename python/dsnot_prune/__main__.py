"""``python -m dsnot_prune`` = the ``dsnot-prune`` command."""
import sys

from .cli import main

sys.exit(main())
