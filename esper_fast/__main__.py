"""``python -m esper_fast``: the ``esper-fast`` command line."""

import sys

from esper_fast.train.cli import main

sys.exit(main())
