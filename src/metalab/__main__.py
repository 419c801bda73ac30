import sys

from metalab.cli import main

sys.exit(main())
