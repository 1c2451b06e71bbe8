"""Backstop: a PostgreSQL safety gateway and recovery layer for SQL written by AI agents."""

import os

__version__ = "0.1.0"

if os.environ.get("BACKSTOP_PURE"):  # plain Python even where a compiled build exists
    from backstop_core.native import prefer_source

    prefer_source()
