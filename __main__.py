import sys

from neodeploy.cli import main

sys.exit(main())
