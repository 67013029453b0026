"""`ray job submit --working-dir . -- python jobs/rebuild.py …`: the same options as `autoknow rebuild`.

Inside a submitted job RAY_ADDRESS is set by the job server, so the run joins that cluster.
"""
import sys

from autoknow_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rebuild", *sys.argv[1:]]))
