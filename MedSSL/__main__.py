"""``python -m MedSSL`` = the ``medssl`` command."""

import sys

from MedSSL.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
