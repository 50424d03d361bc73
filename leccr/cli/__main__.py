"""`python -m leccr.cli ...`: the `leccr` command."""
import sys

from leccr.cli import main

sys.exit(main())
