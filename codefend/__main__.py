import sys

from codefend.cli import main

sys.exit(main())
