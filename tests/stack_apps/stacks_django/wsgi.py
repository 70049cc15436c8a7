"""WSGI entry point, as ``django-admin startproject`` writes it (plus the
matrix's import-error version)."""

from __future__ import annotations

import os

import stackapp

stackapp.fail_import_if_asked()

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stacks_django.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
