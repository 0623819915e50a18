"""Celery workers: ingestion of new-listing events (see :mod:`workers.app`)."""
