import sys

from dbpool.cli import main

sys.exit(main())
