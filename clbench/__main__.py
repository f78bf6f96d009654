import sys

from clbench.cli.commands import main

sys.exit(main())
