"""``python -m pymeta`` runs the ``pymeta`` command."""

import sys

from pymeta.cli import main

sys.exit(main())
