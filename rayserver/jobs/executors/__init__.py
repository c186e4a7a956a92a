"""Where a job's procwrap runs: on this host through the fork server
(``forkserver``: the single-threaded process that forks procwraps, and the
worker's asyncio client for it), or on a cluster through Slurm (``slurm``:
sbatch, squeue, scancel). Imports ``jobs`` and ``common`` only.
"""
