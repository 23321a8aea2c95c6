"""``python -m spap.cli`` (and ``torchrun -m spap.cli``): the ``spap`` command."""

import sys

from . import main

sys.exit(main())
