"""Harvest jobs on a Ray cluster, through the Ray Jobs API (what ``ray job submit`` uses).

The library behind ``harvest submit / status / logs / stop / jobs``::

    from cluster import submit, status, wait, logs, stop, list_jobs
    job = submit("jobs/gptj-6b-outliers.yaml", "http://127.0.0.1:8265", store_url="/mnt/shared/stores")
    print(status(job.job_id).progress)          # batches and tokens done of total, tokens/s, ETA
    wait(job.job_id)                            # until SUCCEEDED / FAILED / STOPPED

Modules, one job each: ``connection`` (the address, a client that fails fast), ``resources``
(what a job asks for), ``submission`` (``submit``), ``entrypoint`` (what runs inside the job),
``protocol`` (the tagged log lines between the two), ``progress`` (counts from the store or the
log), ``state`` (status, wait, logs, stop, the list), ``cli`` (the commands).
"""

from .state import JobStatus, list_jobs, logs, status, stop, wait
from .submission import SubmittedJob, submit

__all__ = ["JobStatus", "SubmittedJob", "list_jobs", "logs", "status", "stop", "submit", "wait"]
