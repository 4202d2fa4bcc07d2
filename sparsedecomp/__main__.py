"""``python -m sparsedecomp`` is the ``sparsedecomp`` command."""

import sys

from .cli import main

sys.exit(main())
