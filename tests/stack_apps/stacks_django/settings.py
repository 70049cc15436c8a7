"""Settings of the matrix's Django project: no database, no middleware that
would touch the bodies (CSRF), every host allowed (loopback only)."""

SECRET_KEY = "stacks-matrix-test-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "stacks_django.urls"
INSTALLED_APPS = ["stacks_django.apps.StacksConfig"]
MIDDLEWARE: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
# The echo endpoint takes 1 MB bodies; Django's default cap is 2.5 MB.
DATA_UPLOAD_MAX_MEMORY_SIZE = 4 * 1024 * 1024
LOGGING = {"version": 1, "disable_existing_loggers": False}
