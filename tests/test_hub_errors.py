"""A hub model that cannot be had: one line naming what was tried and the offline way, asked of
the hub once (no retries), in every command; a cached one loads when the hub is unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import RepositoryNotFoundError

from lorakit import hub
from lorakit.models import load_model

MISSING = "some-org/does-not-exist"
TRIED = (
    rf"model '{MISSING}': not a local folder, not a built-in model \(smollm2-135m, minilm\), and "
)


@pytest.fixture
def online(monkeypatch):
    """Hub access allowed (the suite runs with HF_HUB_OFFLINE=1); nothing from the last test."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    hub.locate.cache_clear()
    yield
    hub.locate.cache_clear()


def _never_loaded(monkeypatch):
    """transformers is not asked: its retries are what took ~50 s."""
    import transformers

    def fail(*a, **k):
        raise AssertionError("from_pretrained was called")

    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", fail)


def _probe_raises(monkeypatch, error: Exception) -> list[str]:
    calls: list[str] = []

    def get_hf_file_metadata(url, **kw):
        calls.append(url.split("/resolve/")[0].split("/", 3)[-1])  # the repo id
        raise error

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", get_hf_file_metadata)
    return calls


def test_unreachable_hub_is_one_probe_then_a_clear_error(online, monkeypatch):
    calls = _probe_raises(monkeypatch, httpx.ConnectError("[Errno 111] Connection refused"))
    _never_loaded(monkeypatch)
    with pytest.raises(
        FileNotFoundError,
        match=TRIED + r"not in the hub cache .*could not be reached \(ConnectError: "
        r".*Connection refused\); to work offline, download it .*\(hf download "
        rf"{MISSING} --local-dir DIR\) and pass that folder, or use a built-in model",
    ):
        load_model(MISSING)
    assert calls == [MISSING]


def test_missing_hub_model_says_so(online, monkeypatch):
    response = httpx.Response(404, request=httpx.Request("GET", "https://hub/api/models/x"))
    _probe_raises(monkeypatch, RepositoryNotFoundError("404 Client Error", response=response))
    _never_loaded(monkeypatch)
    with pytest.raises(FileNotFoundError, match=TRIED + r"the hub \(.*\) has no such model"):
        load_model(MISSING)


def test_offline_mode_asks_only_the_cache(monkeypatch):
    hub.locate.cache_clear()
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    calls = _probe_raises(monkeypatch, AssertionError("the hub was asked"))
    _never_loaded(monkeypatch)
    with pytest.raises(
        FileNotFoundError,
        match=TRIED + r"not in the hub cache .*; HF_HUB_OFFLINE is set, so the hub was not "
        r"asked\. Unset HF_HUB_OFFLINE to download it, or to work offline",
    ):
        load_model(MISSING)
    assert calls == []


def test_a_cached_model_loads_when_the_hub_is_unreachable(online, monkeypatch, tiny):
    """Read from the cache's snapshot folder, without asking again; it keeps its hub id as its
    name (a saved adapter's base_model_name_or_path), not the cache path."""
    calls = _probe_raises(monkeypatch, httpx.ConnectTimeout("timed out"))
    monkeypatch.setattr(hub, "_cached_folder", lambda repo_id: str(tiny))
    model, _ = load_model("some-org/tiny")
    assert calls == ["some-org/tiny"]
    assert model.name_or_path == model.config._name_or_path == "some-org/tiny"


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_every_command_fails_in_one_line(command, tmp_path):
    """The real client against a closed port: refused at once, one line, exit code 2."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello", "label": 1}) + "\n")
    args = {
        "train": ["--data", str(data), "--output", str(tmp_path / "run"), "--no-progress"],
        "eval": ["--data", str(data)],
        "generate": ["--prompt", "hi"],
    }[command]
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    run = subprocess.run(
        [sys.executable, "-m", "lorakit", command, "--model", MISSING, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    line = next(x for x in run.stderr.splitlines() if x.startswith(f"lorakit {command}: error:"))
    assert f"model '{MISSING}': not a local folder, not a built-in model" in line
    assert "the hub (http://127.0.0.1:9) could not be reached" in line
    assert f"hf download {MISSING} --local-dir DIR" in line
