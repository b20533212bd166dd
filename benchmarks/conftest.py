import os
import sys

# Let the suite import its helpers (common.py) whatever the working directory.
sys.path.insert(0, os.path.dirname(__file__))
