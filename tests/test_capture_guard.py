"""capture_guard: a CUDA graph capture never overlaps an NVDEC call (they synchronise the context, which spoils
a capture in another thread), and decode calls overlap each other freely."""
from __future__ import annotations

import threading
import time

from iv2trt.capture_guard import CaptureGuard


def test_a_capture_waits_for_decode_calls_and_holds_new_ones_back():
    guard, events, lock = CaptureGuard(), [], threading.Lock()

    def note(what):
        with lock:
            events.append(what)

    def decode(name, hold_s):
        with guard.shared():
            note(f"{name} in")
            time.sleep(hold_s)
            note(f"{name} out")

    first = threading.Thread(target=decode, args=("a", 0.3))
    first.start()
    while "a in" not in events:
        time.sleep(0.001)

    def capture():
        with guard.exclusive():
            note("capture in")
            time.sleep(0.2)
            note("capture out")

    cap = threading.Thread(target=capture)
    cap.start()
    time.sleep(0.05)  # the capture waits for "a"; a decode call arriving now waits for the capture
    late = threading.Thread(target=decode, args=("b", 0.0))
    late.start()
    for t in (first, cap, late):
        t.join(5)
    assert events == ["a in", "a out", "capture in", "capture out", "b in", "b out"], events
    assert guard.calls == 0


def test_decode_calls_run_side_by_side():
    guard, inside, most = CaptureGuard(), [0], [0]
    lock = threading.Lock()

    def decode():
        with guard.shared():
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.1)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=decode) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert most[0] == 4


def test_an_error_inside_releases_the_guard():
    guard = CaptureGuard()
    for scope in (guard.shared, guard.exclusive):
        try:
            with scope():
                raise RuntimeError("capture invalidated")
        except RuntimeError:
            pass
    done = threading.Event()
    threading.Thread(target=lambda: (guard.exclusive().__enter__(), done.set())).start()
    assert done.wait(2) and guard.calls == 0
