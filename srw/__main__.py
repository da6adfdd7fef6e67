import sys

from srw.cli import main

sys.exit(main())
