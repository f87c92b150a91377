"""`python -m heidi` runs the CLI."""
import sys

from heidi.cli import main

sys.exit(main())
