# Generated from pool/ownership/_async/__init__.py by .ci/generate_sync.py (the unasync
# package's rewrite of async code as sync code): do not edit; edit the
# source and run `python .ci/generate_sync.py`.  CI fails when this file is stale.
"""The sync twins of ``pool/ownership/_async``, generated from it."""
