"""The actors: one per connection, with the pieces they are built from.

- :mod:`~dbpool.actors.connection`: the connection actor (connect, backoff,
  after_connect, pings, reconnects).
- :mod:`~dbpool.actors.backoff`: DBConnection's backoff sequences.
- :mod:`~dbpool.actors.listeners`: connection events and their listeners.
- :mod:`~dbpool.actors.supervisor`: restart intensity for the pool actor.
- :mod:`~dbpool.actors.scheduler`: timers, which pykka does not have.
- :mod:`~dbpool.actors.slot`: one connection's state as it is lent around.
- :mod:`~dbpool.actors.messages`: what the actors tell each other.

The pool actor that supervises them is :mod:`dbpool.pool.pool_actor`.
"""
