"""The remote client library (``Client``, ``AsyncClient``) for ``dbpool serve``.

It arrives with the ZeroMQ front end; until then this package is empty.
"""
