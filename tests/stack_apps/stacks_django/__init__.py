"""A Django 5.2 project with the matrix's HTTP endpoints (see ``stackapp``).

DJANGO_SETTINGS_MODULE=stacks_django.settings gunicorn stacks_django.wsgi
"""
