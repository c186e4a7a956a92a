"""``python -m rayserver.procwrap``: the procwrap's stable command line.

Slurm batch scripts already queued (and the fork server's process checks)
name this module, so it stays here while the code lives in
:mod:`rayserver.jobs.procwrap`.
"""

import sys

from rayserver.jobs.procwrap.entry import main

if __name__ == "__main__":
    sys.exit(main())
