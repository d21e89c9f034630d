"""``python -m lcm_tools ...``: see :mod:`lcm_tools.cli`."""

import sys

from .cli import main

sys.exit(main())
