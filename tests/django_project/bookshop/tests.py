"""The bookshop's own suite, run by ``manage.py test`` on ENGINE "dbpool.django".

``CatalogueTests`` (a ``TestCase``: each test in a transaction Django rolls
back) covers queries with joins, Django's adapters and nested atomic
blocks; ``PooledTransactionTests`` (a ``TransactionTestCase``: real commits)
covers ``select_for_update`` between two threads, commits and rollbacks
seen from another session, and every connection being a dbpool checkout.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from django.db import IntegrityError, connection, transaction
from django.db.backends.postgresql.base import Cursor as DjangoCursor
from django.db.models import Count, F
from django.test import TestCase, TransactionTestCase

from bookshop.models import Author, Book, Tag
from dbpool.pool import Pool

#: A bound on every wait for another thread or session (never reached when all is well).
WAIT = 10.0


def dbpool_pool() -> Pool:
    """The dbpool pool Django's connection comes from (it has connected by now)."""
    connection.ensure_connection()
    pool = connection.dbpool_pool
    assert pool is not None, "ENGINE dbpool.django started no pool"
    return pool


class CatalogueTests(TestCase):
    @classmethod
    def setUpTestData(cls) -> None:
        le_guin = Author.objects.create(name="Ursula K. Le Guin")
        banks = Author.objects.create(name="Iain M. Banks")
        sf, classic = Tag.objects.bulk_create([Tag(name="sf"), Tag(name="classic")])
        cls.dispossessed = Book.objects.create(
            title="The Dispossessed", author=le_guin,
            published=datetime(1974, 5, 1, 12, 30, tzinfo=UTC),
            details={"pages": 387, "awards": ["Hugo", "Nebula"]})
        lathe = Book.objects.create(title="The Lathe of Heaven", author=le_guin,
                                    details={"pages": 184})
        player = Book.objects.create(title="The Player of Games", author=banks,
                                     details={"pages": 293})
        cls.dispossessed.tags.add(sf, classic)
        lathe.tags.add(sf)
        player.tags.add(sf)

    def test_select_related_joins_the_author_in_one_query(self) -> None:
        with self.assertNumQueries(1):
            rows = [(book.title, book.author.name)
                    for book in Book.objects.select_related("author").order_by("title")]
        self.assertEqual(rows, [("The Dispossessed", "Ursula K. Le Guin"),
                                ("The Lathe of Heaven", "Ursula K. Le Guin"),
                                ("The Player of Games", "Iain M. Banks")])

    def test_prefetch_related_loads_the_tags_in_a_second_query(self) -> None:
        with self.assertNumQueries(2):
            tags = {book.title: sorted(tag.name for tag in book.tags.all())
                    for book in Book.objects.prefetch_related("tags")}
        self.assertEqual(tags, {"The Dispossessed": ["classic", "sf"],
                                "The Lathe of Heaven": ["sf"],
                                "The Player of Games": ["sf"]})

    def test_filters_and_aggregates_across_relations(self) -> None:
        classics = Book.objects.filter(tags__name="classic", author__name__startswith="Ursula")
        self.assertEqual(list(classics.values_list("title", flat=True)), ["The Dispossessed"])
        counts = Author.objects.annotate(n=Count("books")).order_by("name")
        self.assertEqual([(a.name, a.n) for a in counts],
                         [("Iain M. Banks", 1), ("Ursula K. Le Guin", 2)])

    def test_json_and_aware_datetimes_load_with_djangos_adapters(self) -> None:
        book = Book.objects.get(pk=self.dispossessed.pk)
        # JSONField parses jsonb itself: it needs Django's jsonb-as-text loader
        # on the pooled connection, or it is given a dict and fails.
        self.assertEqual(book.details, {"pages": 387, "awards": ["Hugo", "Nebula"]})
        self.assertEqual(book.published, datetime(1974, 5, 1, 12, 30, tzinfo=UTC))
        self.assertEqual(book.published.tzinfo, UTC)
        self.assertEqual(Book.objects.filter(details__pages__gt=300).get().pk, book.pk)

    def test_a_failed_nested_atomic_block_rolls_back_only_itself(self) -> None:
        with transaction.atomic():
            Author.objects.create(name="outer")
            with self.assertRaises(IntegrityError), transaction.atomic():
                Author.objects.create(name="inner")
                Author.objects.create(name="Iain M. Banks")  # unique: fails the inner block
            Author.objects.create(name="after")
        names = set(Author.objects.values_list("name", flat=True))
        self.assertEqual(names - {"Ursula K. Le Guin", "Iain M. Banks"}, {"outer", "after"})

    def test_the_connection_is_a_dbpool_checkout_of_the_test_database(self) -> None:
        pool = dbpool_pool()
        raw = connection.connection
        name = connection.settings_dict["NAME"]
        self.assertTrue(name.startswith("test_"), name)
        self.assertEqual(raw.info.dbname, name)
        self.assertGreaterEqual(pool.metrics()["connections"]["in_use"], 1)
        # What Django's own connect would have set, on the pool's connection.
        self.assertIs(raw.cursor_factory, DjangoCursor)
        self.assertIsNone(raw.prepare_threshold)


class PooledTransactionTests(TransactionTestCase):
    def setUp(self) -> None:
        self.book = Book.objects.create(title="Excession", stock=5,
                                        author=Author.objects.create(name="Iain M. Banks"))

    def test_select_for_update_blocks_another_thread_until_commit(self) -> None:
        connected = threading.Event()
        done = threading.Event()
        seen: dict[str, Any] = {}

        def buyer() -> None:  # a thread has a Django connection of its own
            try:
                connection.ensure_connection()
                seen["pid"] = connection.connection.info.backend_pid
                connected.set()
                with transaction.atomic():
                    book = Book.objects.select_for_update().get(pk=self.book.pk)
                    seen["stock"] = book.stock
                    book.stock -= 1
                    book.save(update_fields=["stock"])
            except BaseException as exc:
                seen["error"] = exc
            finally:
                connection.close()  # back to the pool
                done.set()

        thread = threading.Thread(target=buyer, name="buyer")
        with transaction.atomic():
            Book.objects.select_for_update().get(pk=self.book.pk)
            my_pid = connection.connection.info.backend_pid
            thread.start()
            self.assertTrue(connected.wait(WAIT), "the buyer thread did not connect")
            self.assertNotEqual(seen["pid"], my_pid)
            # Wait until the server says our lock blocks the buyer; `done` would
            # end the wait at once if the buyer got through instead.
            deadline = time.monotonic() + WAIT
            while my_pid not in self.blocking_pids(seen["pid"]):
                self.assertFalse(done.wait(0.01), f"the buyer was not blocked: {seen}")
                self.assertLess(time.monotonic(), deadline, "the buyer never waited for the lock")
            Book.objects.filter(pk=self.book.pk).update(stock=F("stock") - 2)
        # Committed: the lock is released and the buyer reads the committed row.
        self.assertTrue(done.wait(WAIT), "the buyer never got the lock")
        thread.join(WAIT)
        self.assertNotIn("error", seen)
        self.assertEqual(seen["stock"], 3)
        self.assertEqual(Book.objects.get(pk=self.book.pk).stock, 2)

    def blocking_pids(self, pid: int) -> list[int]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_blocking_pids(%s)", [pid])
            return list(cursor.fetchone()[0])

    def test_commits_and_nested_rollbacks_are_real(self) -> None:
        with transaction.atomic():
            Author.objects.create(name="kept")
            try:
                with transaction.atomic():
                    Author.objects.create(name="dropped")
                    raise RuntimeError("roll the inner block back")
            except RuntimeError:
                pass
        # Seen from a session of its own, outside Django and the pool.
        db = connection.settings_dict
        with psycopg.connect(dbname=db["NAME"], user=db["USER"], password=db["PASSWORD"],
                             host=db["HOST"], port=db["PORT"]) as other:
            names = {row[0] for row in other.execute("SELECT name FROM bookshop_author")}
        self.assertEqual(names, {"Iain M. Banks", "kept"})

    def test_each_connection_is_a_dbpool_checkout(self) -> None:
        pool = dbpool_pool()
        connection.close()
        self.assertIsNone(connection.connection)
        self.assertEqual(pool.metrics()["connections"]["in_use"], 0)
        before = pool.metrics()["checkouts"]
        for _ in range(3):
            self.assertEqual(Author.objects.count(), 1)  # connects: a checkout
            self.assertEqual(pool.metrics()["connections"]["in_use"], 1)
            connection.close()  # gives it back, as at the end of a request
        self.assertEqual(pool.metrics()["checkouts"], before + 3)
        self.assertEqual(pool.metrics()["connections"]["in_use"], 0)
