"""``python -m flowdiff``: the ``flowdiff`` command (also what ``torchrun -m flowdiff ...`` starts in each process)."""

import sys

from .cli import main

sys.exit(main())
