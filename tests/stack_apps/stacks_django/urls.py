from __future__ import annotations

from django.urls import path

from stacks_django import views

urlpatterns = [
    path("fast", views.fast),
    path("slow", views.slow),
    path("stream", views.stream),
    path("echo", views.echo),
]
