"""Backstop: a PostgreSQL safety gateway and recovery layer for SQL written by AI agents."""

__version__ = "0.1.0"
