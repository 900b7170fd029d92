"""``python -m esper_fast``: the ``esper-fast`` command line."""

import sys

from esper_fast.cli import main

sys.exit(main())
