"""Alembic migrations of the annotation store (run by ``omeflow annotations migrate``)."""
