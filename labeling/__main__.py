"""Entry point of ``python -m labeling`` (see :mod:`labeling.cli`)."""

import sys

from labeling.cli import main

sys.exit(main())
