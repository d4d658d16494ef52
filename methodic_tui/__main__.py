import sys

from methodic_tui.cli import main

sys.exit(main())
