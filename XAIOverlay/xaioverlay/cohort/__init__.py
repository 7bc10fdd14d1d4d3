"""Cohorts: many cases explained (and measured) on a Dask cluster, into one folder per case and one table.

- :mod:`.manifest` — the cases (CSV manifest or folder of volumes), refused in one line when malformed;
- :mod:`.case` — one case as a Dask task, its folder published atomically with a checksum manifest;
- :mod:`.table` — ``cohort.csv`` / ``cohort.parquet`` rebuilt from the case folders;
- :mod:`.run` — the cluster, the tasks, retries, ``--resume`` and progress;
- :mod:`.command` — the ``xaioverlay cohort`` command line.
"""

from .case import CaseSettings
from .manifest import Case, read_cases
from .run import CohortResult, run_cohort

__all__ = ["Case", "CaseSettings", "CohortResult", "read_cases", "run_cohort"]
