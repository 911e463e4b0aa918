"""A file the check keeps whole is uploaded while it is checked (tasks.upload.upload_ahead):
the batch is made as soon as the check passes. Against the emulator over real HTTP and the
session's Prefect server (the shard claims)."""

from __future__ import annotations

import pytest
from prefect import flow

from prefect_kluster.flows import batch_inference
from prefect_kluster.tasks import RequestFileError, claims
from prefect_kluster.tasks import build as build_steps
from prefect_kluster.tasks import upload as upload_steps
from prefect_kluster.tasks.journal import Journal
from prefect_kluster.tasks.submit import identity_key, shard_identity
from prefect_kluster.tasks.upload import PEEK_BYTES, as_one_shard, upload_ahead
from tests.helpers import read_jsonl, request, requests, write_jsonl
from tests.server import recorded_task_runs, wait_for

UPLOADS = "POST /v1/files"
DELETES = "DELETE /v1/files/{id}"


def _calls(emulator) -> dict[str, int]:
    return emulator.stats()["requests"]


def _task_names(state) -> list[str]:
    runs = recorded_task_runs(state.state_details.flow_run_id, "join-round")
    return [r.name.rsplit("-", 1)[0] for r in runs]


def _claims_left(state_dir) -> list:
    keys = {e["key"] for e in Journal(str(state_dir)).events()}
    return [c for key in keys for c in claims._claims(key)]


def test_a_file_kept_whole_is_uploaded_while_it_is_checked(tmp_path, kluster_env, monkeypatch):
    """The check is held until the file has reached the service: the upload is made beside
    it (not after it), once, and the batch is made from that upload; the shard's own upload
    step sends nothing, no clean-up is needed, and the claim is given back."""
    rows = requests(40) + [request("uni", "Объясни 東京 🚀 naïve")]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    check = build_steps.shard_and_tally
    seen: list[int] = []

    def check_once_uploaded(*args, **kwargs):
        seen.append(wait_for(lambda: _calls(kluster_env).get(UPLOADS, 0), 30, "the upload"))
        return check(*args, **kwargs)

    monkeypatch.setattr(build_steps, "shard_and_tally", check_once_uploaded)
    state = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "out.jsonl"),
        run={"poll_interval": 0.05},
        return_state=True,
    )
    result = state.result()
    assert seen == [1], "the check ran only after the file was on the service"
    assert result.status == "completed" and result.summary.succeeded == len(rows)
    assert [r["custom_id"] for r in read_jsonl(result.output_path)] == [
        r["custom_id"] for r in rows
    ]
    stats = kluster_env.stats()
    assert stats["requests"][UPLOADS] == 1 and stats["requests"].get(DELETES, 0) == 0
    [batch] = stats["batches"]
    shard = result.shards[0].shard
    # the upload is the shard the check made: its bytes and its name
    assert shard.sha256 == as_one_shard(str(src)).sha256
    events = Journal(str(tmp_path / "out.jsonl.work" / "state")).events()
    uploaded = [e for e in events if e["event"] == "uploaded"]
    assert [e["file_id"] for e in uploaded] == [batch["input_file_id"]]
    names = _task_names(state)
    assert "upload-ahead" in names and "upload-shard" not in names, names
    assert "clean-up-uploads" not in names, names
    assert _claims_left(tmp_path / "out.jsonl.work" / "state") == []


def test_a_file_refused_past_its_first_lines_is_deleted_from_the_service(tmp_path, kluster_env):
    """A bad line beyond the first lines looked at: the file went ahead, the check names the
    line, and the upload is deleted and its claim given back: nothing is left behind."""
    rows = requests(5000)
    good = write_jsonl(tmp_path / "good.jsonl", rows).read_bytes()
    assert len(good) > PEEK_BYTES
    src = tmp_path / "in.jsonl"
    src.write_bytes(good + b'{"custom_id": "late", "method": "POST"}\n')
    with pytest.raises(RequestFileError, match=r"line 5001: .*`url`"):
        batch_inference(input_path=str(src), output_path=str(tmp_path / "out.jsonl"))
    stats = kluster_env.stats()
    assert stats["requests"][UPLOADS] == 1 and stats["requests"][DELETES] == 1
    assert stats["files"] == 0 and stats["batches"] == []
    assert _claims_left(tmp_path / "out.jsonl.work" / "state") == []
    assert not (tmp_path / "out.jsonl").exists()


def test_a_file_the_check_would_change_or_split_is_uploaded_once_checked(tmp_path, kluster_env):
    """CRLF line ends (rewritten by the check) and a file cut into shards are not sent ahead:
    each shard is uploaded once, as it was checked, and nothing is deleted."""
    crlf = write_jsonl(tmp_path / "crlf.jsonl", requests(5), newline=b"\r\n")
    state = batch_inference(
        input_path=str(crlf),
        output_path=str(tmp_path / "crlf-out.jsonl"),
        run={"poll_interval": 0.05},
        return_state=True,
    )
    assert state.result().summary.succeeded == 5
    assert _calls(kluster_env)[UPLOADS] == 1 and DELETES not in _calls(kluster_env)
    assert "upload-shard" in _task_names(state)

    split = write_jsonl(tmp_path / "split.jsonl", requests(6, prefix="s-"))
    state = batch_inference(
        input_path=str(split),
        output_path=str(tmp_path / "split-out.jsonl"),
        limits={"max_requests_per_file": 3},
        run={"poll_interval": 0.05},
        return_state=True,
    )
    assert state.result().summary.succeeded == 6
    assert _calls(kluster_env)[UPLOADS] == 3 and DELETES not in _calls(kluster_env)
    assert _task_names(state).count("upload-shard") == 2


@pytest.mark.parametrize(
    "options",
    [
        {"limits": {"max_cost": 100.0}},
        {"run": {"upload_while_checking": False}},
    ],
    ids=["cost-limit", "turned-off"],
)
def test_no_upload_ahead_when_a_cost_limit_may_refuse_or_it_is_off(tmp_path, kluster_env, options):
    """A cost limit refuses a run before any upload, so nothing goes ahead of the check."""
    src = write_jsonl(tmp_path / "in.jsonl", requests(3))
    run = {"poll_interval": 0.05, **options.get("run", {})}
    state = batch_inference(
        input_path=str(src),
        output_path=str(tmp_path / "out.jsonl"),
        run=run,
        limits=options.get("limits", {}),
        return_state=True,
    )
    assert state.result().summary.succeeded == 3
    names = _task_names(state)
    assert "upload-ahead" not in names and "upload-shard" in names, names
    assert _calls(kluster_env)[UPLOADS] == 1


def _ahead(credentials, src, state_dir):
    @flow
    def upload_it():
        return upload_ahead(credentials, str(src), str(state_dir), 0.0)

    return upload_it()


def test_a_claim_another_run_holds_is_left_alone_and_the_upload_deleted(
    tmp_path, credentials, emulator
):
    """Another run holds the shard's claim: the upload made beside the claim's request is
    deleted, the other run's claim stays, and the run goes the usual way (None)."""
    src = write_jsonl(tmp_path / "in.jsonl", requests(3))
    key = identity_key(shard_identity(as_one_shard(str(src))))
    theirs = claims.try_acquire(key)  # outside a flow run: this process's owner, not the run
    assert theirs is not None
    try:
        assert _ahead(credentials, src, tmp_path / "state") is None
        stats = emulator.stats()
        assert stats["requests"][UPLOADS] == 1 and stats["requests"][DELETES] == 1
        assert stats["files"] == 0
        assert [c.name for c in claims._claims(key)] == [theirs.name]
    finally:
        claims.release(key)


def test_a_file_written_to_while_it_uploads_is_not_kept(
    tmp_path, credentials, emulator, monkeypatch
):
    """What was sent is unknown if the file changed meanwhile: the upload is deleted and the
    claim given back, and the check's own shard is uploaded later."""
    src = write_jsonl(tmp_path / "in.jsonl", requests(3))
    create = upload_steps._create_file

    def create_then_append(*args, **kwargs):
        answer = create(*args, **kwargs)
        with open(src, "ab") as handle:
            handle.write(b"\n")
        return answer

    monkeypatch.setattr(upload_steps, "_create_file", create_then_append)
    key = identity_key(shard_identity(as_one_shard(str(src))))
    assert _ahead(credentials, src, tmp_path / "state") is None
    stats = emulator.stats()
    assert stats["requests"][UPLOADS] == 1 and stats["files"] == 0
    assert claims._claims(key) == []


def test_as_one_shard_takes_only_what_the_check_keeps_byte_for_byte(tmp_path):
    rows = requests(3)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    shard = as_one_shard(str(plain))
    assert shard is not None and shard.lines == 3 and shard.bytes == plain.stat().st_size
    assert as_one_shard(str(plain), max_requests_per_file=2) is None
    assert as_one_shard(str(plain), max_file_bytes=plain.stat().st_size - 1) is None
    assert as_one_shard(str(write_jsonl(tmp_path / "crlf.jsonl", rows, newline=b"\r\n"))) is None
    unended = tmp_path / "unended.jsonl"
    unended.write_bytes(plain.read_bytes().rstrip(b"\n"))
    assert as_one_shard(str(unended)) is None
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert as_one_shard(str(empty)) is None
    # the check's own shard of the plain file has the same hash
    [made] = build_steps.shard_request_file(str(plain), str(tmp_path / "shards"))
    assert made.sha256 == shard.sha256


def test_first_lines_pass_as_the_check_would(tmp_path):
    good = write_jsonl(tmp_path / "g.jsonl", requests(2)).read_bytes()
    assert build_steps.first_lines_pass(good)
    assert build_steps.first_lines_pass(good + b'{"custom_id": "cut-')  # a partial line: unread
    assert not build_steps.first_lines_pass(good + b"\n")  # a blank line
    assert not build_steps.first_lines_pass(b'{"name": "not a request"}\n')
    assert not build_steps.first_lines_pass(good, models=["some/other-model"])
    assert not build_steps.first_lines_pass(b"")
