"""Revisions of the annotation store's schema, oldest first."""
