"""A bookshop: authors, books and tags, to run Django's ORM on ENGINE "dbpool.django"."""
