#!/usr/bin/env python
"""Submit `kiln prep` to an existing Ray cluster as a Ray job (same as `kiln launch ray`).

    python launch/ray_prep_job.py --address http://HEAD:8265 -- kiln prep data/raw --out data/prepped --workers 64
    python launch/ray_prep_job.py --address http://HEAD:8265 --dry-run -- kiln prep ...

The working directory (`--working-dir`, default: this checkout) is uploaded as the
job's runtime env; the job id and the `ray job logs` command are printed; `--detach`
returns at once instead of streaming the logs.

SECURITY: Ray's job API runs any code it is sent and has no authentication. Keep
the dashboard/jobs port (8265) of a cluster head on a private network or behind an
SSH tunnel (`ssh -L 8265:localhost:8265 head`); never expose it publicly.
"""

import os
import sys

if __name__ == "__main__":
    os.execvp("kiln", ["kiln", "launch", "ray", *sys.argv[1:]])
