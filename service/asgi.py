"""The object Hypercorn serves: `hypercorn -c hypercorn.toml service.asgi:app`.

Each worker process imports this module and builds its own app; pools, loops and clients
are created lazily inside the worker, never in a parent process.
"""

from __future__ import annotations

from service.server import build_asgi_app

app = build_asgi_app()
