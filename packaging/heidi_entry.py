"""Entry point of the frozen heidi executable."""
import sys

from heidi.cli import main

if __name__ == "__main__":
    sys.exit(main())
