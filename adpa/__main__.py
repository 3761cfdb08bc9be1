import sys

from adpa.cli import main

sys.exit(main())
