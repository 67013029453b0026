import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait: where the driver trains a model while Ray workers
# (or another job) use the same cores, each side's spinning starves the other. Measured on a
# 2-core machine with one other busy process: a tagger epoch took 250 s spinning, 33 s passive.
# Set before torch loads its OpenMP runtime; a value the user exports wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
