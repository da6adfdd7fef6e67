import gc
import sys

from srw.cli import main

code = main()
# The interpreter's last collections at exit walk every object the imports made,
# for nothing: 0.3-0.6 s per process measured (each role of a node, each CLI call).
gc.freeze()
sys.exit(code)
