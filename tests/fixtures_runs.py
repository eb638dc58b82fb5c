"""The dashboard tests' synthetic run dirs now live in :mod:`lab.synthetic_runs` (benchmarks use them too)."""

from lab.synthetic_runs import *  # noqa: F403
from lab.synthetic_runs import (  # noqa: F401
    FIXTURE_KINDS,
    SyntheticRun,
    append_step,
    make_complete,
    no_fsync,
    run_config,
    write_run,
)
