"""Everything aiohttp: the app and its routes under ``/v1`` (``api``), job
intake and its checks (``jobspec``), the allow-list, token and connection
guard (``security``), the dashboard (``dashboard/``: routes and static files),
the share probe (``shareprobe``) and the configuration watcher
(``confwatch``). It may import ``jobs`` and ``common``, never ``daemon`` or
the client.
"""
