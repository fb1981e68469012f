"""Alembic migrations, run programmatically at server start (``server.store.engine.migrate``)."""
