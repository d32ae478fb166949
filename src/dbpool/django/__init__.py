"""Django's database backend on dbpool (ENGINE ``"dbpool.django"``)."""
