"""``python -m metapl`` (also what ``torchrun -m metapl train ...`` runs)."""

import sys

from metapl.commands.cli import main

sys.exit(main())
