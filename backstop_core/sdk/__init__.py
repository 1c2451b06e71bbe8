"""Backstop inside the application: the gateway's classifier, policy, approvals and audit,
judging each statement before a driver sends it.

The shared guard is `LocalGuard` (`backstop_core.sdk.core`); the drivers wrap it:
`backstop_core.sdk.psycopg.connect`, `backstop_core.sdk.psycopg2.connect` and
`backstop_core.sdk.sqlalchemy.protect` (install the `sdk` extra). Each driver raises
refusals that are both Backstop's classes below and the driver's own error classes.
"""

from backstop_core.sdk.core import (
    ApprovalDenied,
    ApprovalRequired,
    ApprovalTimedOut,
    BackstopBlocked,
    BackstopError,
    LocalGuard,
    LocalSession,
    Ticket,
)

__all__ = [
    "ApprovalDenied",
    "ApprovalRequired",
    "ApprovalTimedOut",
    "BackstopBlocked",
    "BackstopError",
    "LocalGuard",
    "LocalSession",
    "Ticket",
]
