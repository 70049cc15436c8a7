"""The project's one app: its ``ready()`` is the project's start-up."""

from __future__ import annotations

import stackapp
from django.apps import AppConfig


class StacksConfig(AppConfig):
    name = "stacks_django"

    def ready(self) -> None:
        stackapp.start_up_blocking()
