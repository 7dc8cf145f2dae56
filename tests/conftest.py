import os

import pytest

# Offline by default: nothing in the suite may wait on a hub.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches and HF caches in a per-session temporary folder."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("TWIST_FL_CACHE", str(root / "twist-cache"))
    monkeypatch.setenv("HF_HOME", str(root / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
