"""The ingest section of the configuration: what the catalogue readers and validators take
(not the root `Config`, which brings every module's section with it)."""
from __future__ import annotations

from pydantic import Field

from autoknow_ray.runtime_config import Strict


class IngestConfig(Strict):
    max_id_chars: int = 256
    max_title_chars: int = 1000
    max_description_chars: int = 100_000
    max_bullets: int = 100
    max_attributes: int = 500
    max_value_chars: int = 1000
    rows_per_block: int = 2000
    max_rows_per_file: int = 500_000
    # a table (and the product ids it is checked against) at most this large is de-duplicated
    # and checked by one Ray task instead of a hash shuffle and a join: the shuffles' fixed cost
    # (actor pools, several executions) dominates small catalogues. 0 = always shuffle.
    single_task_rows: int = Field(100_000, ge=0)
    single_task_bytes: int = Field(64 * 2**20, ge=0)  # on-disk bytes of the staged table
