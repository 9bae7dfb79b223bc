"""The scan's stages on their own, without processes or a model: the batcher's rule, the
assembler's counting and order, the run and stall rule, typed events through a pipe."""

from __future__ import annotations

import multiprocessing as mp

from deepscan.scan import ScanSettings
from deepscan.scan.assemble import Assembler, build_record, error_record, row_of
from deepscan.scan.batcher import BATCH_WAIT_S, MAX_WAIT_S, Batcher, Pending
from deepscan.scan.events import ClipMeta, Done, Head, Job, Runs, Slot, Started, Tail, overdue


def pending(index: int, t: float, k: int = 0) -> Pending:
    return Pending(index, Slot(k), ClipMeta(0, k, k, 0.0, (0.0, 0.0, 10.0, 10.0)), t)


def test_a_full_batch_leaves_at_once_in_arrival_order():
    b = Batcher(3)
    for k in range(4):
        b.add(pending(k % 2, 0.0, k))
    chunk = b.take(0.0, lane_idle=False, more_coming=True)
    assert [p.slot.number for p in chunk] == [0, 1, 2] and len(b) == 1


def test_a_part_filled_batch_waits_for_its_deadline_an_idle_lane_or_the_end():
    b = Batcher(8)
    b.add(pending(0, 10.0))
    assert b.take(10.1, lane_idle=False, more_coming=True) is None
    assert abs(b.due(10.1) - (BATCH_WAIT_S - 0.1)) < 1e-9
    assert b.take(10.0 + BATCH_WAIT_S, lane_idle=False, more_coming=True) is not None  # the deadline
    b.add(pending(0, 20.0))
    assert b.take(20.0, lane_idle=True, more_coming=True) is not None  # a lane has nothing to do
    b.add(pending(0, 30.0))
    assert b.take(30.0, lane_idle=False, more_coming=False) is not None  # nothing more can come
    assert b.take(30.0, lane_idle=True, more_coming=False) is None and b.due(30.0) == MAX_WAIT_S


def test_dropping_a_video_takes_only_its_clips():
    b = Batcher(8)
    for k, index in enumerate([0, 1, 0, 2]):
        b.add(pending(index, 0.0, k))
    assert [p.slot.number for p in b.drop(0)] == [0, 2]
    assert [p.index for p in b.drop()] == [1, 2] and len(b) == 0


def test_records_leave_in_input_order_whatever_order_videos_complete_in():
    done = []
    asm = Assembler(ScanSettings(), model={"name": "m"}, detector="dlib", on_complete=done.append)
    for i in range(3):
        asm.open(i, f"v{i}.mp4")
        asm.started(i, Head(sha256=f"h{i}"))
        asm.expect(i)
    meta = ClipMeta(0, 0, 0, 0.0, (1.0, 1.0, 5.0, 5.0))
    asm.scored([(2, meta), (1, meta)], [0.9, 0.2], {}, 1.0, None)
    asm.ended(2, Tail())
    asm.ended(1, Tail())
    assert done == [2, 1] and list(asm.take()) == []  # the first is not done: nothing leaves yet
    asm.scored([(0, meta)], [0.4], {}, 0.5, None)
    assert asm.videos[0].left == 0 and not done[2:]  # scored, but its preparation has not ended
    asm.ended(0, Tail())
    out = list(asm.take())
    assert [r["path"] for r, _ in out] == ["v0.mp4", "v1.mp4", "v2.mp4"]
    assert [r["verdict"] for r, _ in out] == ["real", "real", "fake"] and out[2][0]["sha256"] == "h2"
    assert all(row == row_of(rec) for rec, row in out) and asm.idle and dict(asm.verdicts) == {"real": 2, "fake": 1}


def test_a_lost_video_is_an_error_and_its_scores_are_dropped():
    asm = Assembler(ScanSettings(), model={}, detector="dlib")
    asm.open(0, "a.mp4")
    asm.expect(0, 3)
    asm.dropped(0, 2)
    asm.ended(0, Tail(), "a.mp4: the preparation worker died while reading it")
    assert 0 in asm.videos  # one clip is still with the model
    asm.scored([(0, ClipMeta(0, 0, 0, 0.0, (1.0, 1.0, 5.0, 5.0)))], [0.99], {}, 0.1, None)
    ((rec, row),) = list(asm.take())
    assert rec["verdict"] == "error" and rec["tracks"] == [] and row.note.startswith("the preparation worker")


def test_every_record_has_the_same_fields():
    s = ScanSettings()
    early = error_record("x", "x: no such file", settings=s, model={}, detector="dlib")
    asm = Assembler(s, model={}, detector="dlib")
    asm.open(0, "x", error="x: no such file")
    ((late, _),) = list(asm.take())
    assert set(early) == set(late) == set(build_record("y", settings=s, model={}, detector="dlib"))
    assert early["verdict"] == late["verdict"] == "error" and early["error"] == late["error"]


def test_only_the_current_run_is_ours_and_the_stall_rule():
    runs = Runs()
    assert not runs.ours(Job(0, 0))
    first = runs.begin()
    assert runs.ours(Job(first, 5))
    second = runs.begin()
    assert not runs.ours(Job(first, 5)) and runs.ours(Job(second, 0))
    runs.end(second)
    assert not runs.ours(Job(second, 0))
    assert overdue(0.0, 10.5, 10.0) and not overdue(0.0, 10.0, 10.0)


def test_typed_events_cross_a_pipe_as_they_are():
    ours, theirs = mp.Pipe()
    sent = [Started(Job(1, 2), Head(sha256="s", box_scale=2.0)), Done(Job(1, 2), Tail(error="e", warnings=["w"]))]
    for ev in sent:
        theirs.send(ev)
    got = [ours.recv() for _ in sent]
    assert got == sent and type(got[0].job) is Job and got[0].job.run == 1
