"""Fixtures for the Python binding tests: the generated `kith` module loaded next to
the built library, and a real kith-collector on 127.0.0.1 port 0."""

import base64
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
WRITE_KEY = "python-write-key"
ADMIN_TOKEN = "python-admin-token"


@pytest.fixture(scope="session")
def kith_dir(tmp_path_factory):
    """A directory holding kith.py and libkith.so, importable as `kith`."""
    directory = tmp_path_factory.mktemp("kith-module")
    shutil.copy(REPO / "sdk-mobile/bindings/python/kith.py", directory)
    shutil.copy(REPO / "target/debug/libkith.so", directory)
    sys.path.insert(0, str(directory))
    return directory


@pytest.fixture(scope="session")
def kith(kith_dir):
    import kith as module

    return module


class Collector:
    def __init__(self, data_dir):
        binary = os.environ.get("KITH_COLLECTOR_BIN", str(REPO / "target/debug/kith-collector"))
        self.process = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--write-key", WRITE_KEY, "--admin-token", ADMIN_TOKEN],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"},
        )
        for line in self.process.stdout:
            if line.startswith("listening on "):
                self.url = line.removeprefix("listening on ").strip()
                break
        else:
            raise RuntimeError("the collector did not start")

    def admin(self, path):
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def stored(self):
        """Every stored event (messages), once the pipeline has caught up."""
        deadline = time.monotonic() + 30
        while self.admin("/v1/stats")["pending"] != 0:
            assert time.monotonic() < deadline, "pipeline did not catch up"
            time.sleep(0.01)
        events, path = [], "/v1/events?limit=1000"
        while True:
            page = self.admin(path)
            events += [e["message"] for e in page["events"]]
            if page["next_before"] is None:
                return events
            path = f"/v1/events?limit=1000&before={page['next_before']}"

    def stop(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def collector(tmp_path):
    running = Collector(tmp_path / "collector")
    yield running
    running.stop()


def basic_auth(key):
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()
