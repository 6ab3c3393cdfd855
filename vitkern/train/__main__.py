"""`python -m vitkern.train`: see vitkern/train/cli.py."""

import sys

from vitkern.train.cli import main

sys.exit(main())
