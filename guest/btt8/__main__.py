"""`python -m btt8`."""

import sys

from .cli import main

sys.exit(main())
