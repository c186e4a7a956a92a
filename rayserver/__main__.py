"""``python -m rayserver``: the rayserver command line."""

import sys

from rayserver.cli import main

sys.exit(main())
