"""Alembic migrations, run programmatically at server start (``server.db.migrate``)."""
