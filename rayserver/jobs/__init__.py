"""The queue and how a job runs, without aiohttp: the job database
(``jobdb``), the scheduler that starts queued jobs on free cpus and adopts
running ones after a restart (``scheduler``), the executors that start and
stop procwraps (``executors/``: the local fork server, Slurm), and the
procwrap that runs one job's steps (``procwrap/``). It imports only
``common``; the HTTP layer calls into it, never the reverse.
"""
