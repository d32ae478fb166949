"""Authors write books (ForeignKey); books carry tags (ManyToMany)."""

from __future__ import annotations

from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=100, unique=True)

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    tags = models.ManyToManyField(Tag, related_name="books", blank=True)
    # A timestamptz and a jsonb: Django's adapters load them (aware datetimes,
    # jsonb as text for JSONField), so they show whether a pooled connection
    # carries Django's adapters while Django holds it.
    published = models.DateTimeField(null=True)
    details = models.JSONField(default=dict)
    stock = models.IntegerField(default=0)

    def __str__(self) -> str:
        return self.title
