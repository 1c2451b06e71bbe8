"""Settings: a TOML file, overridden by BACKSTOP_* environment variables, overridden by flags.

Every entry point (`backstop-tui` and each `backstop` subcommand) accepts the same flags
through `add_settings_arguments`, and builds its Settings with `settings_from_args`.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DEFAULT_LISTEN = "127.0.0.1:6432"


class SettingsError(Exception):
    """A setting is wrong; the message names it and says what is expected."""


@dataclass(frozen=True, slots=True)
class UpstreamDSN:
    """The parts of a libpq URL the gateway and the control connection use."""

    host: str
    port: int
    user: str | None
    password: str | None
    database: str | None
    sslmode: str | None
    sslrootcert: str | None


@dataclass(frozen=True)
class Settings:
    upstream: str | None = None
    listen: str = DEFAULT_LISTEN
    tls_cert: Path | None = None
    tls_key: Path | None = None
    upstream_sslmode: str = "prefer"
    upstream_sslrootcert: Path | None = None
    state_dir: Path = field(default_factory=lambda: Path(".backstop"))
    policy: Path | None = None
    store: str | None = None
    max_message_size: int = 64 * 1024 * 1024
    metrics: str | None = None
    config_file: Path | None = None

    @property
    def listen_host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_listen(self.listen)[1]

    def upstream_dsn(self) -> UpstreamDSN:
        if not self.upstream:
            raise SettingsError(
                "upstream: no database to protect; pass --upstream postgresql://HOST:PORT/DB, "
                "set BACKSTOP_UPSTREAM, or `upstream = ...` in the config file"
            )
        return parse_dsn(self.upstream)


# name -> (type, flag help). The same names are TOML keys and BACKSTOP_<NAME> variables.
_FIELDS: dict[str, tuple[type, str]] = {
    "upstream": (str, "PostgreSQL to protect, as a libpq URL (postgresql://user@host:5432/db)"),
    "listen": (str, f"address the gateway listens on (default {DEFAULT_LISTEN})"),
    "tls_cert": (Path, "certificate for client-side TLS (PEM)"),
    "tls_key": (Path, "private key for client-side TLS (PEM)"),
    "upstream_sslmode": (str, "TLS to the upstream: " + ", ".join(SSLMODES) + " (default prefer)"),
    "upstream_sslrootcert": (Path, "CA certificate to verify the upstream (verify-ca/verify-full)"),
    "state_dir": (Path, "where audit, approvals and alerts are kept (default ./.backstop)"),
    "policy": (Path, "policy file (default ./policy.json when present, else the built-in one)"),
    "store": (str, "snapshot store: s3://bucket/prefix or file:///path"),
    "max_message_size": (int, "largest protocol message accepted from a client, in bytes"),
    "metrics": (str, "serve Prometheus metrics on HOST:PORT (for example 127.0.0.1:9187)"),
}


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise SettingsError(f"listen: {value!r} is not HOST:PORT (for example {DEFAULT_LISTEN})")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise SettingsError(f"listen: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise SettingsError(f"listen: port {number} is outside 0..65535")
    return host, number


def parse_dsn(dsn: str) -> UpstreamDSN:
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise SettingsError(
            f"upstream: {_redact(dsn)!r} is not a postgresql:// URL "
            "(for example postgresql://app@db.internal:5432/shop)"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    host = unquote(parts.hostname or "") or query.get("host", "") or "localhost"
    try:
        port = parts.port or int(query.get("port", "5432"))
    except ValueError:
        raise SettingsError(f"upstream: the port in {_redact(dsn)!r} is not a number") from None
    sslmode = query.get("sslmode")
    if sslmode is not None and sslmode not in SSLMODES:
        raise SettingsError(f"upstream: sslmode {sslmode!r} is not one of {', '.join(SSLMODES)}")
    database = unquote(parts.path.lstrip("/")) or query.get("dbname") or None
    return UpstreamDSN(
        host=host,
        port=port,
        user=unquote(parts.username) if parts.username else query.get("user"),
        password=unquote(parts.password) if parts.password else query.get("password"),
        database=database,
        sslmode=sslmode,
        sslrootcert=query.get("sslrootcert"),
    )


def _redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password:
        return dsn.replace(f":{parts.password}@", ":***@")
    return dsn


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (flags override BACKSTOP_* variables and --config)")
    group.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    for name, (_kind, help_text) in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _coerce(name: str, raw: Any, source: str) -> Any:
    kind = _FIELDS[name][0]
    if raw is None:
        return None
    if kind is int:
        if isinstance(raw, bool):
            raise SettingsError(f"{name} ({source}): expected a whole number, got {raw!r}")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise SettingsError(
                f"{name} ({source}): expected a whole number, got {raw!r}"
            ) from None
    if not isinstance(raw, str):
        raise SettingsError(f"{name} ({source}): expected a string, got {raw!r}")
    return Path(raw).expanduser() if kind is Path else raw


def load_settings(
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the three sources and check the result; raises SettingsError naming the setting."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if config_file is None and env.get("BACKSTOP_CONFIG"):
        config_file = Path(env["BACKSTOP_CONFIG"])
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except FileNotFoundError:
            raise SettingsError(f"config: {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config: {config_file} is not valid TOML: {exc}") from None
        section = data.get("backstop", data)
        if "backstop" in data and len(data) > 1:
            stray = ", ".join(sorted(k for k in data if k != "backstop"))
            raise SettingsError(
                f"config: {config_file} has settings outside its [backstop] table ({stray}); "
                "put them all in one place"
            )
        for key, raw in section.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                known = ", ".join(sorted(_FIELDS))
                raise SettingsError(f"config: unknown setting {key!r} in {config_file} ({known})")
            values[name] = _coerce(name, raw, str(config_file))
    for name in _FIELDS:
        var = "BACKSTOP_" + name.upper()
        if env.get(var):
            values[name] = _coerce(name, env[var], var)
    for name, raw in (flags or {}).items():
        if name in _FIELDS and raw is not None:
            values[name] = _coerce(name, raw, "--" + name.replace("_", "-"))
    if "policy" not in values and Path("policy.json").is_file():
        values["policy"] = Path("policy.json")
    settings = Settings(config_file=config_file, **values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    parse_listen(settings.listen)
    if settings.upstream_sslmode not in SSLMODES:
        raise SettingsError(
            f"upstream_sslmode: {settings.upstream_sslmode!r} is not one of {', '.join(SSLMODES)}"
        )
    if settings.upstream is not None:
        parse_dsn(settings.upstream)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SettingsError("tls_cert/tls_key: give both, or neither")
    for name in ("tls_cert", "tls_key", "upstream_sslrootcert", "policy"):
        path = getattr(settings, name)
        if path is not None and not Path(path).is_file():
            raise SettingsError(f"{name}: {path} does not exist or is not a file")
    if settings.store is not None and not settings.store.startswith(("s3://", "file://")):
        raise SettingsError(
            f"store: {settings.store!r} is not an s3://bucket/prefix or file:///path URL"
        )
    if settings.metrics is not None:
        try:
            parse_listen(settings.metrics)
        except SettingsError as exc:
            raise SettingsError(str(exc).replace("listen:", "metrics:", 1)) from None
    if settings.max_message_size < 1024:
        raise SettingsError("max_message_size: must be at least 1024 bytes")


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    flags = {name: getattr(args, name, None) for name in _FIELDS}
    return load_settings(config_file=getattr(args, "config", None), env=env, flags=flags)


def effective_sslmode(settings: Settings) -> str:
    """The DSN's sslmode wins over the default; an explicit setting wins over both."""
    dsn_mode = parse_dsn(settings.upstream).sslmode if settings.upstream else None
    if settings.upstream_sslmode != "prefer" or dsn_mode is None:
        return settings.upstream_sslmode
    return dsn_mode
