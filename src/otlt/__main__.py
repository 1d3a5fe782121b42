import sys

from otlt.cli import main

sys.exit(main())
