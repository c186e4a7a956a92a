"""The ``rayserver`` command and its start-up order: the command line and the
manual's messages (``cli``), the log file (``logsetup``), and the worker
process that starts the fork server before any thread and then serves HTTP
(``worker``). The top layer: it may import ``server``, ``jobs``, ``common``
and the generic ``supervisor`` package.
"""
