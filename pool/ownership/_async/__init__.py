"""The ownership pool's lending, written once for asyncio; ``pool/ownership/_sync``
is generated from here by ``.ci/generate_sync.py`` (see :mod:`dbpool.pool._async`)."""
