import sys

from platescope.cli import main

sys.exit(main())
