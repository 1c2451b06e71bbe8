"""Backstop terminal dashboard."""
