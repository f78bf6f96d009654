import sys

from clbench.cli.main import main

sys.exit(main())
