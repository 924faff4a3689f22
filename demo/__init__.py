"""A self-contained demo: an embedded redis-server, a real Celery worker, a producer flood."""
