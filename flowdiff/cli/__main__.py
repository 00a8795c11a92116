"""``python -m flowdiff.cli``: the ``flowdiff`` command."""

import sys

from . import main

sys.exit(main())
