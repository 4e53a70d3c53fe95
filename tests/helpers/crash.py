"""A child for safe_train.py's tests that fails at once, every time, as a broken setup would."""
import sys

print("helper: failing on purpose", file=sys.stderr)
sys.exit(1)  # what a Python traceback exits with
