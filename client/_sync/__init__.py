# Generated from client/_async/__init__.py by .ci/unasync_client.py (the unasync
# package's rewrite of async code as sync code): do not edit; edit the source and
# run `python .ci/unasync_client.py`.  CI fails when this file is stale.
"""The client's requests, sync: generated from ``client/_async``."""
