"""``python -m paper_assets.cli``."""

import sys

from . import main

sys.exit(main())
