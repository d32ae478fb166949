#!/usr/bin/env python
"""The bookshop test project's manage.py: ``python manage.py test`` runs its suite
on ENGINE "dbpool.django" (see bookshop_site/settings.py for the database)."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bookshop_site.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
