"""Moved to :mod:`lcm_tools` (issue #10): ``python -m lcm_core.runner ...`` still works and runs ``python -m lcm_tools ...``."""

import sys

if __name__ == "__main__":
    from lcm_tools.cli import main

    sys.exit(main())
