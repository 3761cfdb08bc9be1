import gc
import sys

from adpa.cli import main

code = main()
# The interpreter's last collection would scan every object of the stack and the models again
# (1.5 s per process); the stage's outputs are written and published by now.
gc.freeze()
sys.exit(code)
