import sys

from uffdpoison.cli import main

sys.exit(main())
