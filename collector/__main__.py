"""``python -m collector`` is the ``collector`` command."""

import sys

from .cli import main

sys.exit(main())
