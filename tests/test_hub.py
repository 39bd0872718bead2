"""No network: an uncached hub model fails within seconds with one line, a cached file still loads, and
hub errors map to one line by their type. The hub is a closed local port or a local socket that accepts
and never answers; the real network is never touched."""

from __future__ import annotations

import socket
import time

import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from sdlora.errors import ModelError
from sdlora.models import hub, load_pipeline

LIMIT_S = 10.0  # what a user waits at most before the one-line error


@pytest.fixture
def online(monkeypatch):
    """HF_HUB_OFFLINE unset (the suite sets it) and a fresh probe; everything is restored afterwards."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.setattr(hub, "_went_offline", False)

    def point_hub_at(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)

    return point_hub_at


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A socket that accepts connections (the kernel completes the handshake) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def one_line(exc: BaseException, *fragments: str) -> None:
    text = str(exc)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, text


@pytest.mark.parametrize("hub_kind", ["closed port", "silent server"])
def test_uncached_model_fails_fast_with_one_line_when_the_hub_is_unreachable(online, silent_server, hub_kind):
    # the clock measures the wait for the hub, not importing diffusers (seconds on a busy machine)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
    from transformers import AutoConfig  # noqa: F401

    online(f"http://127.0.0.1:{closed_port()}" if hub_kind == "closed port" else silent_server)
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        load_pipeline("sdlora-tests/no-such-model")
    assert time.monotonic() - start < LIMIT_S
    one_line(
        info.value,
        "model sdlora-tests/no-such-model: not in the local cache and the hub is unreachable",
        "--model tiny-sd",
    )
    # offline from now on, for every loader of this process: the next one does not probe again
    assert constants.is_offline_mode()
    start = time.monotonic()
    from sdlora.evaluate.dino import load_dino

    with pytest.raises(ModelError) as info:
        load_dino("sdlora-tests/no-such-dino", "cpu")
    assert time.monotonic() - start < 2.0
    one_line(info.value, "scorer model sdlora-tests/no-such-dino: not in the local cache", "--dino-model tiny-dino")


def test_the_score_cli_fails_fast_too(online, tmp_path):
    from typer.testing import CliRunner

    from conftest import one_line_error
    from score_helpers import add_samples, write_run
    from sdlora.cli import app

    online(f"http://127.0.0.1:{closed_port()}")
    run = write_run(tmp_path)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)
    start = time.monotonic()
    result = CliRunner().invoke(app, ["score", "--run", str(run), "--clip-model", "tiny-clip", "--device", "cpu"])
    assert time.monotonic() - start < LIMIT_S
    one_line_error(result, "scorer model facebook/dino-vits16: not in the local cache and the hub is unreachable")


def test_a_cached_file_still_loads_once_offline(online, tmp_path):
    """Going offline is HF_HUB_OFFLINE's meaning: what is in the cache loads, without a request."""
    from huggingface_hub import hf_hub_download

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--sdlora-tests--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    online(f"http://127.0.0.1:{closed_port()}")
    assert hub.hub_offline() and constants.is_offline_mode()
    path = hf_hub_download("sdlora-tests/cached", "model_index.json", cache_dir=tmp_path)
    assert path.endswith(f"{commit}/model_index.json")


def test_a_reachable_hub_is_probed_once(online, monkeypatch):
    calls = []

    def fake_urlopen(request, timeout):
        calls.append((request.get_method(), request.full_url, timeout))
        raise hub.urllib.error.HTTPError(request.full_url, 404, "not found", {}, None)  # an answer: reachable

    monkeypatch.setattr(hub.urllib.request, "urlopen", fake_urlopen)
    online("http://127.0.0.1:9")
    assert not hub.hub_offline() and not hub.hub_offline()
    assert calls == [("HEAD", "http://127.0.0.1:9", hub.PROBE_TIMEOUT_S)]
    assert not constants.is_offline_mode()


def test_offline_set_by_the_user_is_not_probed(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored afterwards
    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.setattr(hub, "_went_offline", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline() and hub._probed == {}
    with pytest.raises(ModelError) as info:
        load_pipeline("sdlora-tests/no-such-model")
    one_line(info.value, "not in the local cache and downloads are off (HF_HUB_OFFLINE=1)")


def _wrapped(inner: BaseException) -> OSError:
    """What transformers and diffusers raise: their own OSError, raised from the hub's error."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise OSError("We couldn't connect to the hub\nand more lines") from exc
    except OSError as outer:
        return outer


def _response(status: int):
    import httpx2

    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))


@pytest.mark.parametrize(
    ("inner", "fragment"),
    [
        (LocalEntryNotFoundError("no file"), "not in the local cache"),
        (GatedRepoError("gated", response=_response(403)), "gated on the hub"),
        (RepositoryNotFoundError("nope", response=_response(404)), "not found on the hub"),
        (ValueError("something else"), "could not be loaded (We couldn't connect to the hub)"),
    ],
)
def test_hub_errors_map_by_type_through_wrappers(inner, fragment):
    error = hub.hub_error("model x/y", _wrapped(inner), "or use --model tiny-sd for an offline try")
    assert isinstance(error, ModelError)
    one_line(error, "model x/y: ", fragment)
