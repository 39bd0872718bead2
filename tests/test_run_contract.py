"""The run folder's shared files: samples.json and scores.json have one writer and one reader each, and
both check the schema, so a file that is off the contract is a one-line RunError naming the file and
the field (at write time in the stage that made it, at read time in the stage that uses it)."""

from __future__ import annotations

import json

import pytest

from sdlora.errors import RunError
from sdlora.run import read_samples, read_scores, write_samples, write_scores

ENTRY = {"file": "a/lora-00.png", "prompt": "sksToy toy", "prompt_as_written": "sksToy", "seed": 0, "index": 0}


def samples(**entry) -> dict:
    return {"model": "tiny-sd", "images": [{**ENTRY, "variant": "lora", **entry}]}


def scores(**overall) -> dict:
    row = {"images": 1, "dino": 0.5, "clip_i": 0.5, "clip_t": 0.25, "clip_t_with_token": None}
    return {
        "schema_version": 1,
        "overall": {"lora": row, "baseline": None, **overall},
        "prompts": [{"prompt": "sksToy toy", "lora": row, "baseline": None}],
        "scorers": {"dino": {"model": "tiny-dino"}},
        "real": {"count": 2},
    }


def test_round_trip(tmp_path):
    assert read_samples(write_samples(tmp_path / "samples.json", samples())) == samples()
    assert read_scores(write_scores(tmp_path / "scores.json", scores())) == scores()
    assert read_samples(tmp_path / "none.json", missing_ok=True) == {"images": []}
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (samples(variant="both"), "images[0].variant is 'both', expected 'lora' or 'baseline'"),
        (samples(seed="0"), "images[0].seed is '0', expected int"),
        (samples(file="../../etc/passwd"), "images[0].file '../../etc/passwd' is not a path inside samples/"),
        ({"image": []}, "images is missing"),
        ([], "the top level is not a JSON object"),
    ],
)
def test_samples_off_the_contract(tmp_path, data, fragment):
    path = tmp_path / "samples.json"
    with pytest.raises(RunError) as at_write:
        write_samples(path, data)
    assert not path.exists()
    path.write_text(json.dumps(data))
    with pytest.raises(RunError) as at_read:
        read_samples(path)
    for info in (at_write, at_read):
        message = str(info.value)
        assert message.startswith(f"{path}: ") and fragment in message and "sdlora sample" in message
        assert "\n" not in message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({**scores(), "schema_version": 0}, "schema_version is 0, this sdlora reads 1"),
        (scores(lora={"images": 1}), "overall.lora.dino is missing"),
        (scores(baseline=[]), "overall.baseline is [], expected an object"),
        ({**scores(), "prompts": [{"lora": None}]}, "prompts[0].prompt is missing"),
        ({**scores(), "real": {}}, "real.count is missing"),
    ],
)
def test_scores_off_the_contract(tmp_path, data, fragment):
    path = tmp_path / "scores.json"
    with pytest.raises(RunError, match="sdlora score") as info:
        write_scores(path, data)
    assert fragment in str(info.value) and not path.exists()
    path.write_text(json.dumps(data))
    with pytest.raises(RunError) as info:
        read_scores(path)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(RunError, match=r"scores.json: missing \(`sdlora score` writes it\)"):
        read_scores(tmp_path / "scores.json")
    (tmp_path / "samples.json").write_text("{not json")
    with pytest.raises(RunError, match="samples.json: not a samples.json written by `sdlora sample`"):
        read_samples(tmp_path / "samples.json")
