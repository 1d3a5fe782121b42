"""``python -m otlt.cli`` (how torchrun starts otlt: ``torchrun ... -m otlt.cli train``)."""

import sys

from otlt.cli import main

sys.exit(main())
