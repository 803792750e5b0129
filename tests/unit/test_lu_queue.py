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


# ---- commands run by the submitting thread (a connection's receiver)

def test_start_now_takes_the_leading_simple_tasks_while_nothing_waits():
    q = TaskQueue(3)
    a, b, o, c = entry("a"), entry("b"), entry("o", ORDERED), entry("c")
    assert q.start_now([a, b, o, c]) == 2          # stops at the ORDERED task
    assert q.start_now([c, entry("d")]) == 1       # room for one more within the limit
    assert not q.put(entry("e"))                    # started ones count against the depth
    for e in (a, b, c):
        q.finish(e)
    q.put(o)                                        # an ORDERED task waiting ...
    assert q.start_now([entry("f")]) == 0           # ... keeps younger ones behind it
    assert q.take(parker())[0] is o
    assert q.start_now([entry("g")]) == 0           # ... and so does one running
    q.finish(o)
    assert q.start_now([entry("h", HEAD_OF_QUEUE)]) == 0   # only SIMPLE tasks
    q.close()
    assert q.start_now([entry("i")]) == 0


class QuickDevice(SlowDevice):
    """Runs commands whose first CDB byte is 1 on the submitting thread."""

    def __init__(self, delay=0.0):
        super().__init__()
        self.gate.set()
        self.delay = delay
        self.threads = {}

    def quick(self, cdb):
        return cdb[0] == 1

    def execute(self, task):
        self.threads[task.n] = threading.current_thread()
        time.sleep(self.delay)
        super().execute(task)


def quick_task(n, length=4096, attr=SIMPLE):
    task = Task(n, attr)
    task.cdb = b"\x01" + bytes(5)
    task.transfer_length = length
    return task


def wait_for(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_quick_commands_run_on_the_submitting_thread_and_the_rest_on_workers():
    dev = QuickDevice()
    lu = LogicalUnit(Config(8), {0: dev}, max_sessions=1)
    done = []
    slow = Task(3)                                  # not quick: a worker runs it
    big = quick_task(4, length=1 << 20)             # quick, but too large to run here
    lu.submit_many([(quick_task(1), lambda t, a: done.append(t.n)),
                    (quick_task(2), lambda t, a: done.append(t.n)),
                    (slow, lambda t, a: done.append(t.n)),
                    (quick_task(5), lambda t, a: done.append(t.n))], run_here=True)
    me = threading.current_thread()
    assert dev.threads[1] is me and dev.threads[2] is me
    assert {1, 2} <= set(done)                      # answered before submit_many returned
    assert wait_for(lambda: len(done) == 4)
    assert dev.threads[3] is not me and dev.threads[5] is not me   # behind a non-quick one
    lu.submit_many([(big, lambda t, a: done.append(t.n))], run_here=True)
    assert wait_for(lambda: 4 in done) and dev.threads[4] is not me
    lu.submit_many([(quick_task(6), lambda t, a: done.append(t.n))])   # not asked to
    assert wait_for(lambda: 6 in done) and dev.threads[6] is not me
    assert lu.stats.snapshot()[(0, "n1")].commands == 6    # both kinds of thread counted
    lu.shutdown()


def test_a_slow_command_sends_the_next_ones_to_the_workers(monkeypatch):
    import istgt.lu.unit as unit
    monkeypatch.setattr(unit, "INLINE_SLOW_NS", 10_000_000)
    dev = QuickDevice(delay=0.05)
    lu = LogicalUnit(Config(8), {0: dev}, max_sessions=1)
    me = threading.current_thread()
    lu.submit_many([(quick_task(1), lambda t, a: None)], run_here=True)
    assert dev.threads[1] is me                     # took 50 ms: over the 10 ms bound
    dev.delay = 0
    lu.submit_many([(quick_task(2), lambda t, a: None)], run_here=True)
    assert wait_for(lambda: 2 in dev.threads) and dev.threads[2] is not me
    monkeypatch.setattr(unit, "INLINE_PAUSE_NS", 0)
    lu._inline_paused_until = 0                     # the pause is over
    lu.submit_many([(quick_task(3), lambda t, a: None)], run_here=True)
    assert dev.threads[3] is me
    lu.shutdown()


def test_a_reset_waits_for_a_command_running_on_a_connection_thread():
    dev = QuickDevice()
    dev.gate.clear()
    lu = LogicalUnit(Config(8), {0: dev}, max_sessions=1)
    done = []
    runner = threading.Thread(target=lu.submit_many, args=(
        [(quick_task(1), lambda t, a: done.append((t.n, a)))],), kwargs={"run_here": True})
    runner.start()
    assert wait_for(lambda: dev.started == [1])
    reset_done = threading.Event()
    threading.Thread(target=lambda: (lu.abort_task_set("n1", 0), reset_done.set())).start()
    time.sleep(0.1)
    assert not reset_done.is_set()                  # the running command is waited for
    dev.gate.set()
    assert reset_done.wait(5)
    assert done == [(1, True)]                      # and its answer suppressed
    runner.join(5)
    lu.shutdown()


def test_a_running_head_of_queue_task_holds_back_younger_simple_ones_only():
    q = TaskQueue(10)
    older = entry("older")
    q.put(older)
    q.put(entry("hoq", HEAD_OF_QUEUE))
    hoq = q.take(parker())[0]
    assert hoq.task == "hoq"
    assert q.take(parker())[0] is older            # older than the HEAD OF QUEUE task: runs
    younger = entry("younger")
    q.put(younger)
    assert q.start_now([entry("new")]) == 0       # nothing younger starts beside it ...
    got = []
    t = threading.Thread(target=lambda: got.extend(q.take(parker())))
    t.start()
    time.sleep(0.1)
    assert not got                                 # ... from the queue either
    q.finish(hoq)
    t.join(2)
    assert got == [younger]


def test_queue_depth_zero_never_runs_commands_on_the_submitting_thread():
    dev = QuickDevice()
    lu = LogicalUnit(Config(0), {0: dev}, max_sessions=1)
    done = []
    lu.submit_many([(quick_task(1), lambda t, a: done.append(t.n))], run_here=True)
    assert wait_for(lambda: done == [1])
    assert dev.threads[1] is not threading.current_thread()
    lu.shutdown()


class ClosingDevice(QuickDevice):
    def __init__(self):
        super().__init__(delay=0.5)
        self.closed = False
        self.ran_after_close = []

    def execute(self, task):
        super().execute(task)
        if self.closed:
            self.ran_after_close.append(task.n)

    def close(self):
        self.closed = True


def test_shutdown_waits_for_commands_running_on_a_receiver():
    dev = ClosingDevice()
    lu = LogicalUnit(Config(8), {0: dev}, max_sessions=1)
    receiver = threading.Thread(target=lu.submit_many,
                                args=([(quick_task(1), lambda t, a: None)],),
                                kwargs={"run_here": True})
    receiver.start()
    assert wait_for(lambda: 1 in dev.threads)      # the receiver is inside the command
    lu.shutdown()
    receiver.join(5)
    assert dev.closed and not dev.ran_after_close


class HeldByDevice(SlowDevice):
    """A device command that ends only when the device is reset (a pass-through LUN)."""

    reset_unblocks_tasks = True

    def __init__(self):
        super().__init__()
        self.resets = 0

    def reset(self, kind):
        self.resets += 1
        self.gate.set()


def lu_running_task_1(dev, done=lambda t, aborted: None):
    """A LogicalUnit (QueueDepth 8) whose device is executing task 1."""
    lu = LogicalUnit(Config(8), {0: dev}, max_sessions=1)
    lu.submit(Task(1), done)
    assert wait_for(lambda: dev.started == [1])
    return lu


def abort_waits(monkeypatch, grace_s, wait_s=None):
    """Shorter waits for aborted commands: the grace before a device reset, and the
    whole wait."""
    import istgt.lu.unit as unit
    monkeypatch.setattr(unit, "DEVICE_ABORT_GRACE_S", grace_s)
    if wait_s is not None:
        monkeypatch.setattr(unit, "ABORT_WAIT_S", wait_s)
    return unit


def test_a_lu_reset_resets_a_real_device_before_waiting_for_its_commands():
    dev = HeldByDevice()
    lu = lu_running_task_1(dev)
    started = time.monotonic()
    lu.lun_reset(0)
    assert dev.resets == 1 and time.monotonic() - started < 2   # not the 5 s the command holds
    lu.shutdown()


def test_an_abort_task_a_real_device_holds_resets_the_device_after_a_grace(monkeypatch):
    """SG_IO cannot abort one command: one still held after the grace is ended by a device
    reset, so FUNCTION COMPLETE means the command has no further effect."""
    abort_waits(monkeypatch, 0.3)
    dev = HeldByDevice()
    answers = []
    lu = lu_running_task_1(dev, lambda t, aborted: answers.append(aborted))
    started = time.monotonic()
    assert lu.abort_task("n1", 1)
    assert dev.resets == 1 and 0.3 <= time.monotonic() - started < 2
    assert answers == [True]                       # ended, and its answer dropped
    lu.shutdown()


def test_an_abort_task_a_real_device_ends_in_time_does_not_reset_it(monkeypatch):
    abort_waits(monkeypatch, 2.0)
    dev = HeldByDevice()
    lu = lu_running_task_1(dev)
    threading.Timer(0.2, dev.gate.set).start()     # the device answers on its own
    assert lu.abort_task("n1", 1)
    assert dev.resets == 0
    lu.shutdown()


class UnresettableDevice(HeldByDevice):
    """A device whose reset does not end what it holds."""

    def reset(self, kind):
        self.resets += 1


def test_an_abort_task_whose_command_never_ends_is_not_called_complete(monkeypatch):
    import pytest

    unit = abort_waits(monkeypatch, 0.1, 0.3)
    dev = UnresettableDevice()
    lu = lu_running_task_1(dev)
    with pytest.raises(unit.TaskStillRunning):
        lu.abort_task("n1", 1)
    assert dev.resets == 1
    dev.gate.set()
    lu.shutdown()


def lun_entry(name, lun, attr=SIMPLE):
    from types import SimpleNamespace
    return QueuedTask(SimpleNamespace(name=name, lun=lun), None, attr)


def taken(q):
    """What a worker would take now, or None when nothing may start."""
    with q._lock:
        e = q._pick()
    return e.task.name if e else None


def test_a_sequential_lun_runs_one_task_at_a_time_in_order_while_others_pass():
    """Tapes and changers passed through: one command per LUN, in task-set order; a task of
    another LUN does not wait behind one waiting for its busy tape."""
    q = TaskQueue(20, batch=1)
    q.sequential_luns = frozenset({1, 2})
    for name, lun in (("t1-a", 1), ("t1-b", 1), ("t2-a", 2), ("d-a", 0), ("t1-c", 1)):
        q.put(lun_entry(name, lun))
    assert taken(q) == "t1-a"
    assert taken(q) == "t2-a"                    # passes t1-b, whose tape is busy
    assert taken(q) == "d-a"
    assert taken(q) is None                      # t1-b and t1-c wait for t1-a
    first = next(e for e in q._running if e.task.name == "t1-a")
    q.finish(first)
    assert taken(q) == "t1-b"                    # never t1-c before it


def test_nothing_passes_an_ordered_task_on_a_sequential_unit():
    q = TaskQueue(20, batch=1)
    q.sequential_luns = frozenset({1})
    q.put(lun_entry("t-a", 1))
    assert taken(q) == "t-a"
    q.put(lun_entry("t-b", 1))
    q.put(lun_entry("d-o", 0, ORDERED))
    q.put(lun_entry("d-a", 0))
    assert taken(q) is None                      # d-o waits for t-a; d-a waits behind d-o


def test_no_task_of_a_unit_with_a_sequential_lun_starts_on_a_receiver():
    q = TaskQueue(20)
    q.sequential_luns = frozenset({1})
    assert q.start_now([lun_entry("d-a", 0)]) == 0


def test_a_reload_that_brings_a_tape_makes_its_lun_sequential():
    class Tape(QuickDevice):
        sequential = True

    lu = LogicalUnit(Config(8), {0: QuickDevice()}, max_sessions=1)
    assert lu._queue.sequential_luns == frozenset()
    lu.replace_luns(Config(8), {1: Tape()}, set())
    assert lu._queue.sequential_luns == frozenset({1})
    lu.shutdown()


class PassLikeDevice(HeldByDevice):
    """A pass-through device: ends a held command with end_held_commands, which keeps
    reservations; a task still waiting for a request slot is cancelled, not held."""

    def __init__(self):
        super().__init__()
        self.ended = 0
        self.cancelled = []

    def end_held_commands(self):
        self.ended += 1
        self.gate.set()
        return True

    def cancel_unsent(self, tasks):
        self.cancelled.extend(t.n for t in tasks)


def test_an_abort_ends_a_held_command_with_end_held_commands_not_a_reset(monkeypatch):
    abort_waits(monkeypatch, 0.2)
    dev = PassLikeDevice()
    lu = lu_running_task_1(dev)
    assert lu.abort_task("n1", 1)
    assert dev.cancelled == [1] and dev.ended == 1 and dev.resets == 0
    lu.shutdown()


def test_task_management_with_a_command_that_never_ends_is_not_called_complete(monkeypatch):
    """ABORT TASK SET, CLEAR TASK SET, LU and target resets: TaskStillRunning (answered
    FUNCTION REJECTED) when an aborted command still runs after every wait; the LU and
    target resets still reset the devices."""
    import pytest

    unit = abort_waits(monkeypatch, 0.05, 0.1)
    dev = UnresettableDevice()
    lu = lu_running_task_1(dev)
    for call in (lambda: lu.abort_task_set("n1", 0), lambda: lu.clear_task_set(0, "n1"),
                 lambda: lu.lun_reset(0), lambda: lu.target_reset("warm")):
        with pytest.raises(unit.TaskStillRunning):
            call()
    assert dev.resets >= 3                  # escalations, and the LU and target resets
    dev.gate.set()
    lu.shutdown()
