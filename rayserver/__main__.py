"""``python -m rayserver``: the rayserver command line."""

import sys

from rayserver.daemon.cli import main

sys.exit(main())
