"""Run a script (argv[2:]) and print every thread's stack each argv[1] seconds: where a long
device run spends its time when it produces no output of its own."""

import faulthandler
import runpy
import sys

faulthandler.dump_traceback_later(float(sys.argv[1]), repeat=True)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
