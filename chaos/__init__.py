"""Fault-injection run of single_task under real Celery workers; see chaos/README.md."""
