"""Task attributes in one LU's task set, the depth limit, aborts, and the worker pool."""

import threading
import time

from istgt.lu.queue import HEAD_OF_QUEUE, ORDERED, SIMPLE, QueuedTask, TaskQueue
from istgt.lu.unit import LogicalUnit


def entry(name, attr=SIMPLE):
    return QueuedTask(name, None, attr)


def parker():
    lock = threading.Lock()
    lock.acquire()
    return lock


def test_head_of_queue_starts_first():
    q = TaskQueue(10)
    q.put(entry("a"))
    q.put(entry("h", HEAD_OF_QUEUE))
    assert q.take(parker())[0].task == "h"
    assert q.take(parker())[0].task == "a"


def test_ordered_waits_for_older_and_blocks_younger():
    q = TaskQueue(10)
    a = entry("a")
    q.put(a)
    q.put(entry("o", ORDERED))
    q.put(entry("b"))
    assert q.take(parker()) == [a]
    got = []
    t = threading.Thread(target=lambda: got.extend(q.take(parker(), 8)))
    t.start()
    time.sleep(0.1)
    assert not got                               # o waits for a, b waits behind o
    q.finish(a)
    t.join(2)
    assert got[0].task == "o"
    t2 = threading.Thread(target=lambda: got.extend(q.take(parker(), 8)))
    t2.start()
    time.sleep(0.1)
    assert len(got) == 1                         # b waits until o is done
    q.finish(got[0])
    t2.join(2)
    assert got[1].task == "b"


def test_take_batches_simple_tasks_but_stops_at_ordered():
    q = TaskQueue(10)
    for name in "abc":
        q.put(entry(name))
    q.put(entry("o", ORDERED))
    q.put(entry("d"))
    assert [e.task for e in q.take(parker(), 8)] == ["a", "b", "c"]



def test_limit_refuses_beyond_depth():
    q = TaskQueue(2)
    assert q.put(entry("a")) and q.put(entry("b"))
    assert not q.put(entry("c"))


def test_abort_splits_waiting_and_running():
    q = TaskQueue(10)
    a, b = entry("a"), entry("b")
    q.put(a)
    q.put(b)
    assert q.take(parker()) == [a]
    removed, running = q.abort(lambda e: True)
    assert removed == [b] and running == [a]
    assert a.aborted and b.aborted and not a.finished.is_set()


class Task:
    def __init__(self, n, attr=SIMPLE):
        self.n = n
        self.attr = attr
        self.nexus = "n1"
        self.tag = n
        self.lun = 0
        self.cdb = b"\x00" * 6
        self.status = None
        self.data_in = self.data_out = None    # what the LU's statistics read
        self.transfer_length = 0


class SlowDevice:
    def __init__(self):
        self.gate = threading.Event()
        self.started = []

    def execute(self, task):
        self.started.append(task.n)
        self.gate.wait(5)
        task.status = 0

    def flush(self):
        pass

    def close(self):
        pass


class Config:
    number = 1
    name = "iqn.t"

    def __init__(self, depth):
        self.queue_depth = depth


def test_logical_unit_task_set_full_and_abort():
    dev = SlowDevice()
    lu = LogicalUnit(Config(1), {0: dev}, max_sessions=1)
    done = []
    lock = threading.Lock()

    def cb(task, aborted):
        with lock:
            done.append((task.n, task.status, aborted))
    lu.submit(Task(1), cb)
    time.sleep(0.1)
    lu.submit(Task(2), cb)                       # over QueueDepth x MaxSessions = 1
    assert (2, 0x28, False) in done              # TASK SET FULL at once
    assert lu.abort_task("other", 1) is False    # another nexus' task is not touched
    t = threading.Thread(target=lu.abort_task, args=("n1", 1))
    t.start()
    time.sleep(0.1)
    dev.gate.set()
    t.join(5)
    assert (1, 0, True) in done                  # ran to the end, reported as aborted
    lu.shutdown()


def test_queue_depth_zero_runs_one_at_a_time():
    dev = SlowDevice()
    lu = LogicalUnit(Config(0), {0: dev}, max_sessions=4)
    results = []
    for n in range(3):
        lu.submit(Task(n), lambda t, a: results.append(t.n))
    time.sleep(0.2)
    assert dev.started == [0]
    dev.gate.set()
    deadline = time.time() + 5
    while len(results) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert sorted(results) == [0, 1, 2]
    lu.shutdown()
