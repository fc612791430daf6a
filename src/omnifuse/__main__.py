import sys

from omnifuse.cli import main

sys.exit(main())
