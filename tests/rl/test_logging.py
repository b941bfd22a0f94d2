"""Run logging: strict JSON lines, resume truncation, TensorBoard scalars read back, samples and the progress bar."""

import io
import json
import math
import struct
import sys

import numpy as np
import pytest

from mojax.rl.logging import (
    CompositeLogger,
    JsonlLogger,
    MetricLogger,
    ProgressBar,
    SamplesLogger,
    TensorBoardLogger,
    read_metrics,
    reward_postfix,
)


def lines_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_steps(path, steps, **kwargs):
    logger = JsonlLogger(path, **kwargs)
    for step in steps:
        logger.log(step, {"loss": 1.0 / step, "rewards/helpful/mean": 0.1 * step})
    logger.close()


def test_jsonl_writes_step_first_and_nonfinite_values_as_null(tmp_path):
    logger = JsonlLogger(tmp_path)
    logger.log(3, {"loss": np.float32(0.25), "kl": float("nan"), "grad_norm": float("inf"), "step": 99})
    # Flushed at once: readable before close.
    text = (tmp_path / "metrics.jsonl").read_text()
    logger.close()
    assert text == '{"step": 3, "loss": 0.25, "kl": null, "grad_norm": null}\n'
    [record] = read_metrics(tmp_path)
    assert list(record) == ["step", "loss", "kl", "grad_norm"]
    assert record["step"] == 3 and record["loss"] == 0.25
    assert math.isnan(record["kl"]) and math.isnan(record["grad_norm"])


def test_jsonl_accepts_a_file_path_and_starts_a_new_file_without_resume(tmp_path):
    path = tmp_path / "sub" / "train.jsonl"
    write_steps(path, [1, 2, 3])
    write_steps(path, [1])
    assert [record["step"] for record in read_metrics(path)] == [1]


def test_jsonl_resume_drops_the_steps_after_the_restored_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_steps(path, [1, 2, 3, 4, 5])
    with path.open("a") as stream:  # a crash in the middle of a line
        stream.write('{"step": 6, "lo')
    write_steps(tmp_path, [4, 5], resume_from_step=3)
    assert [record["step"] for record in lines_of(path)] == [1, 2, 3, 4, 5]
    assert lines_of(path)[3]["loss"] == 0.25
    write_steps(tmp_path, [], resume_from_step=0)
    assert path.read_text() == ""


def test_jsonl_resume_without_a_file_starts_one(tmp_path):
    write_steps(tmp_path / "metrics.jsonl", [8], resume_from_step=7)
    assert [record["step"] for record in read_metrics(tmp_path)] == [8]


def test_read_metrics_rejects_a_corrupt_line_that_is_not_the_last(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(tmp_path)


def test_logger_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"JsonlLogger: `resume_from_step` is -1; expected an integer >= 0"):
        JsonlLogger(tmp_path, resume_from_step=-1)
    logger = JsonlLogger(tmp_path)
    with pytest.raises(TypeError, match=r"JsonlLogger.log: `step` is a float"):
        logger.log(1.5, {})
    logger.close()
    with pytest.raises(TypeError, match=r"CompositeLogger: `loggers\[1\]` is a dict; expected a MetricLogger"):
        CompositeLogger(logger, {})


def read_events(path):
    """Every Event in a TFRecord file (u64 length, masked crc32c of it, payload, masked crc32c of the payload)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, events, offset = path.read_bytes(), [], 0
    while offset < len(data):
        header = data[offset : offset + 8]
        (length,) = struct.unpack("Q", header)
        assert struct.unpack("I", data[offset + 8 : offset + 12])[0] == masked_crc32c(header)
        payload = data[offset + 12 : offset + 12 + length]
        assert struct.unpack("I", data[offset + 12 + length : offset + 16 + length])[0] == masked_crc32c(payload)
        events.append(Event.FromString(payload))
        offset += 16 + length
    return events


def scalars_in(log_dir):
    return {
        (value.tag, event.step): value.simple_value
        for path in sorted(log_dir.glob("events.out.tfevents.*"))
        for event in read_events(path)
        for value in event.summary.value
    }


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log(1, {"loss": 0.5, "rewards/helpful/mean": 0.25})
    logger.log(2, {"loss": 0.125, "rewards/helpful/mean": 0.75})
    logger.close()
    assert scalars_in(tmp_path / "tb") == {
        ("loss", 1): 0.5,
        ("rewards/helpful/mean", 1): 0.25,
        ("loss", 2): 0.125,
        ("rewards/helpful/mean", 2): 0.75,
    }
    [path] = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert read_events(path)[0].file_version == "brain.Event:2"


def test_tensorboard_resume_writes_a_purge_marker(tmp_path):
    logger = TensorBoardLogger(tmp_path, resume_from_step=4)
    logger.log(5, {"loss": 1.0})
    logger.close()
    events = [event for path in tmp_path.glob("events.out.tfevents.*") for event in read_events(path)]
    assert any(event.session_log.status == event.session_log.START and event.step == 5 for event in events)


def test_tensorboard_logger_names_the_extra_when_tensorboardx_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match=r'pip install "mojax\[tensorboard\]"'):
        TensorBoardLogger(tmp_path)


class Recorder:
    def __init__(self):
        self.calls, self.closed = [], False

    def log(self, step, metrics):
        self.calls.append((step, dict(metrics)))

    def close(self):
        self.closed = True


def test_composite_logger_forwards_to_every_logger(tmp_path):
    first, second = Recorder(), Recorder()
    assert isinstance(first, MetricLogger)
    composite = CompositeLogger(first, JsonlLogger(tmp_path), second)
    composite.log(1, {"loss": 2.0})
    composite.close()
    assert first.calls == second.calls == [(1, {"loss": 2.0})]
    assert first.closed and second.closed
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_samples_logger_keeps_a_few_completions_with_their_rewards(tmp_path):
    logger = SamplesLogger(tmp_path, max_samples=2)
    rewards = {"helpful": [0.5, 1.0, 0.0], "format": [float("nan"), 1.0, 1.0]}
    logger.log(1, ["p0", "p1", "p2"], ["c0", "c1", "c2"], rewards)
    logger.log(2, ["q0"], ["d0"], {"helpful": [0.25], "format": [0.0]})
    logger.close()
    assert lines_of(tmp_path / "samples.jsonl") == [
        {"step": 1, "prompt": "p0", "completion": "c0", "rewards": {"helpful": 0.5, "format": None}},
        {"step": 1, "prompt": "p1", "completion": "c1", "rewards": {"helpful": 1.0, "format": 1.0}},
        {"step": 2, "prompt": "q0", "completion": "d0", "rewards": {"helpful": 0.25, "format": 0.0}},
    ]
    resumed = SamplesLogger(tmp_path, resume_from_step=1)
    resumed.close()
    assert [line["step"] for line in lines_of(tmp_path / "samples.jsonl")] == [1, 1]
    with pytest.raises(ValueError, match=r"SamplesLogger.log: `rewards\['helpful'\]` has 1 entries; expected 2"):
        SamplesLogger(tmp_path).log(3, ["a", "b"], ["c", "d"], {"helpful": [1.0]})


def test_reward_postfix_shows_the_mean_reward_of_each_logged_objective():
    metrics = {"rewards/helpful/mean": 0.5, "rewards/harmless/mean": -0.25, "rewards/helpful/std": 9.0}
    assert reward_postfix(metrics, ["helpful", "harmless", "concise"]) == {"helpful": "0.500", "harmless": "-0.250"}


def test_progress_bar_moves_to_the_logged_step_and_shows_the_rewards():
    stream = io.StringIO()
    bar = ProgressBar(10, 2, ["helpful", "harmless"], disable=False, file=stream)
    assert isinstance(bar, MetricLogger)
    bar.log(3, {"rewards/helpful/mean": 0.5, "rewards/harmless/mean": -0.25, "loss": 1.0})
    assert bar.postfix == "helpful=0.500, harmless=-0.250"
    bar.log(5, {"rewards/helpful/mean": 0.75})
    bar.close()
    assert bar.postfix == "helpful=0.750"
    assert "5/10" in stream.getvalue() and "helpful=0.750" in stream.getvalue()


def test_progress_bar_is_off_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(10, 0, ["helpful"], file=stream)
    bar.log(1, {"rewards/helpful/mean": 0.5})
    bar.close()
    assert bar.disabled and stream.getvalue() == ""
    with pytest.raises(ValueError, match=r"ProgressBar: `objective_names` holds 'a b'"):
        ProgressBar(10, 0, ["a b"], disable=True)
