"""The client's requests, written once for asyncio; ``client/_sync`` is generated from here.

Edit these files, then run ``python .ci/generate_sync.py`` to write the
sync twin (CI fails when it is stale).
"""
