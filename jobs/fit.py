"""`ray job submit --working-dir . -- python jobs/fit.py …`: the same options as `autoknow fit`.

Inside a submitted job RAY_ADDRESS is set by the job server, so the run joins that cluster.
"""
import sys

from autoknow_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
