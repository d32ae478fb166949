from dbpool.cli import main
import sys
sys.exit(main())
