"""`sdlora push` (sdlora.publish.push): the staged hub/ folder, and the upload against a loopback stand-in
of the Hub (tests/hub_stub.py) that answers only the calls huggingface_hub makes for one commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from typer.testing import CliRunner

import hub_stub
from publish_helpers import fake_run
from sdlora.cli import app
from sdlora.fsutil import sha256_file
from sdlora.publish.card import build_card
from sdlora.publish.push import stage_hub_folder
from sdlora.run import load_run

STAGED = [
    "pytorch_lora_weights.safetensors",
    "r1.safetensors",
    "embeddings.safetensors",
    *(f"samples/p{p}/{stem}-00.png" for p in range(3) for stem in ("lora", "base")),
    "README.md",
]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return fake_run(tmp_path, samples=True, scores=True)


@pytest.fixture
def no_saved_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No HF_TOKEN and no `hf auth login` token file: the test never sees the machine's own token."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, no_saved_token: None):
    """The stand-in Hub at HF_ENDPOINT (also huggingface_hub's constant, read at its import), online, a token."""
    from huggingface_hub import constants

    with hub_stub.HubServer() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.base)
        monkeypatch.setattr(constants, "ENDPOINT", fake.base)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", hub_stub.TOKEN)
        yield fake


def push(*args: str):
    return CliRunner().invoke(app, ["push", *args])


def test_the_staged_folder_holds_what_a_user_shares(run: Path):
    staged = stage_hub_folder(load_run(run), "me/toy")
    assert staged.folder == run / "hub" and staged.files == STAGED
    assert sorted(str(p.relative_to(staged.folder)) for p in staged.folder.rglob("*") if p.is_file()) == sorted(STAGED)
    for rel in STAGED[:-1]:  # the very files of the run (hard links or copies)
        source = run / ("lora" if rel.endswith(".safetensors") else "") / rel
        assert sha256_file(staged.folder / rel) == sha256_file(source), rel
    assert (staged.folder / "README.md").read_text() == str(build_card(run, "me/toy"))
    # a second staging replaces the folder whole: a file from before does not linger, no temp folder stays
    (staged.folder / "old.png").write_bytes(b"x")
    stage_hub_folder(load_run(run), "me/toy")
    assert not (run / "hub" / "old.png").exists() and not list(run.glob(".hub-*"))


def test_no_token_is_one_line_and_leaves_the_card_and_the_folder(run: Path, no_saved_token: None):
    result = push("--repo", "me/toy")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "not pushed: no Hugging Face token" in lines[-1]
    assert "hf auth login" in lines[-1] and "huggingface-cli login" in lines[-1] and "HF_TOKEN" in lines[-1]
    assert (run / "README.md").is_file() and (run / "hub" / "README.md").is_file()
    assert not (run / "push.json").exists()


def test_offline_says_so(run: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = push("--repo", "me/toy")
    assert result.exit_code == 1 and "not pushed: HF_HUB_OFFLINE=1 is set; unset it to push" in result.stderr
    assert (run / "hub" / "README.md").is_file() and not (run / "push.json").exists()


@pytest.mark.parametrize("repo", ["toy", "me/toy/x", "me/to y", ""])
def test_a_bad_repo_id_names_the_flag_and_writes_nothing(run: Path, repo: str):
    result = push("--repo", repo)
    assert result.exit_code == 1 and f"--repo {repo!r}" in result.stderr
    assert not (run / "hub").exists() and not (run / "README.md").exists()


def test_push_makes_one_commit_and_records_it(run: Path, hub: hub_stub.FakeHub):
    result = push("--repo", "me/toy", "--private")
    assert result.exit_code == 0, result.output
    # exactly the calls of a one-commit push, with the token
    assert hub.kinds() == ["whoami", "create", "validate", "preupload", "commit"]
    calls = [h for h in hub.hits if h.path != "/api/agent-harnesses"]
    assert all(h.auth == f"Bearer {hub_stub.TOKEN}" for h in calls)
    create = calls[1].body
    assert (create["organization"], create["name"], create.get("visibility")) == ("me", "toy", "private")
    assert sorted(f["path"] for f in calls[3].body["files"]) == sorted(STAGED)
    # the commit carries every staged file, byte for byte, and the card the Hub reads
    (commit,) = hub.commits
    assert sorted(commit["files"]) == sorted(STAGED)
    for rel, content in commit["files"].items():
        assert content == (run / "hub" / rel).read_bytes(), rel
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.to_dict()["instance_prompt"] == "sksToy"
    assert 'load_lora_weights("me/toy", weight_name="pytorch_lora_weights.safetensors")' in card.text
    assert "run r1, step 40" in commit["header"]["summary"]
    # recorded after success: the repo, the commit, each file's hash
    record = json.loads((run / "push.json").read_text())
    assert record["repo_id"] == "me/toy" and record["commit"] == commit["oid"]
    assert record["url"] == f"{hub.base}/me/toy" and record["commit_url"].endswith(commit["oid"])
    assert record["files"]["r1.safetensors"]["sha256"] == sha256_file(run / "lora" / "r1.safetensors")
    assert f"pushed: {hub.base}/me/toy (commit {commit['oid']})" in result.stdout
    # pushing again: the repo exists (409, fine), a second commit, the record follows it
    again = push("--repo", "me/toy")
    assert again.exit_code == 0, again.output
    assert hub.kinds()[5:] == ["whoami", "create", "validate", "preupload", "commit"]
    assert json.loads((run / "push.json").read_text())["commit"] == hub.commits[1]["oid"] != commit["oid"]


@pytest.mark.parametrize(
    ("fail", "fragment"),
    [
        ({"whoami": 401}, "rejected the token (401"),
        ({"create": 403}, "refused (403): the token may not write to me/toy"),
        ({"commit": 403}, "refused (403): the token may not write to me/toy"),
        ({"commit": 404}, "answered 404"),
        ({"validate": 400}, "refused the upload: Invalid metadata in README.md. - stub: validate fails"),
    ],
)
def test_a_refused_push_leaves_no_record(run: Path, hub: hub_stub.FakeHub, fail: dict, fragment: str):
    hub.fail.update(fail)  # (after a 403 at create, create_repo asks whether the repo exists: a 404 here)
    result = push("--repo", "me/toy")
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "staged (3 model file(s), 6 image(s) and README.md), not pushed: " in line and fragment in line, line
    assert not (run / "push.json").exists() and not hub.commits
    assert (run / "hub" / "README.md").is_file()


def test_an_unreachable_hub_names_the_host(run: Path, monkeypatch: pytest.MonkeyPatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", hub_stub.TOKEN)
    result = push("--repo", "me/toy")
    assert result.exit_code == 1
    assert f"not pushed: cannot reach 127.0.0.1:{port} (" in result.stderr
    assert not (run / "push.json").exists()


def test_dry_run_stages_only(run: Path, no_saved_token: None):
    result = push("--repo", "me/toy", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing uploaded" in result.stdout and (run / "hub" / "README.md").is_file()


def test_a_run_being_trained_is_not_pushed(run: Path):
    import socket

    from sdlora.locks import LOCK_FILE

    (run / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "verb": "train"}))
    result = push("--repo", "me/toy", "--dry-run")
    assert result.exit_code == 1 and "in use by `sdlora train` (pid 1)" in result.stderr
    assert not (run / "hub").exists()
