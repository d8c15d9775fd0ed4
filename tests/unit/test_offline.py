"""The offline-run format: what the tracking hook writes is what `run.py sync` reads (research/offline.py)."""

import json

from mlflow.entities import Metric

from research import offline


def test_a_run_file_reads_back_what_was_written(tmp_path):
    path = offline.run_file(str(tmp_path), "abc123")
    assert path == tmp_path / "offline" / "abc123.jsonl" and offline.artifacts_folder(path) == tmp_path / "offline" / "abc123"
    header = offline.header("baseline", "baseline-2", 1_700_000_000_000, {"train.lr": "0.001"}, {"git.commit": "deadbeef"})
    first = [Metric("train/loss", 4.5, 1000, 7), Metric("train/lr", 1e-3, 1000, 7)]
    offline.append(path, header, first, {"checkpoint.latest": "/ckpt/step_7.pt"})
    offline.append(path, header, [Metric("train/loss", 4.25, 2000, 8)], {"checkpoint.latest": "/ckpt/step_8.pt"})  # the header once
    offline.append(path, status="FAILED", end_reason="RuntimeError: boom")

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum("run" in line for line in lines) == 1 and "run" in lines[0] and lines[-1] == {"status": "FAILED", "end_reason": "RuntimeError: boom"}
    run = offline.read(path)
    assert run.run_id == "abc123" and run.path == path and run.header == header
    assert [(m.key, m.value, m.timestamp, m.step) for m in run.metrics] == [("train/loss", 4.5, 1000, 7), ("train/lr", 1e-3, 1000, 7), ("train/loss", 4.25, 2000, 8)]
    assert run.tags == {"checkpoint.latest": "/ckpt/step_8.pt"}  # the later value wins
    assert (run.status, run.end_reason) == ("FAILED", "RuntimeError: boom")
    assert offline.run_files(path.parent) == [path] and offline.run_files(tmp_path / "none") == []


def test_a_run_that_lost_its_server_only_while_ending_has_no_header(tmp_path):
    path = offline.run_file(str(tmp_path), "r1")
    offline.append(path, status="FINISHED")
    run = offline.read(path)
    assert run.header == {} and run.metrics == [] and (run.status, run.end_reason) == ("FINISHED", None)


def test_a_run_still_going_has_no_status(tmp_path):
    path = offline.run_file(str(tmp_path), "r2")
    offline.append(path, {"experiment": "e"}, [Metric("val/loss", 3.0, 5, 10)])
    path.write_text(path.read_text() + "\n")  # blank lines are skipped
    assert offline.read(path).status is None and len(offline.read(path).metrics) == 1
