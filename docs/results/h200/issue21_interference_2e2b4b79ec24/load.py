"""Background load beside a job: N processes of one kind until SIGTERM; prints work per second at exit.
decode: PyAV decodes the given videos in turn, one thread each (frames/s); spin: a pure-Python loop (Mloops/s);
mem: numpy copies of 256 MB arrays (GB/s). Usage: load.py KIND N NICE [videos...]"""
import multiprocessing as mp, os, signal, sys, time

def child(kind, i, videos, stop, counter):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.nice(NICE)
    if kind == "decode":
        import av
        n = 0
        while not stop.is_set():
            with av.open(videos[(i + n) % len(videos)]) as c:
                s = c.streams.video[0]; s.thread_count = 1; s.thread_type = "SLICE"
                k = 0
                for f in c.decode(s):
                    k += 1
                    if stop.is_set(): break
            n += 1
            with counter.get_lock(): counter.value += k
    elif kind == "spin":
        while not stop.is_set():
            x = 0
            for j in range(1_000_000): x += j
            with counter.get_lock(): counter.value += 1
    else:
        import numpy as np
        a = np.ones(256 << 20, np.uint8); b = np.empty_like(a)
        while not stop.is_set():
            np.copyto(b, a)
            with counter.get_lock(): counter.value += 0.25

if __name__ == "__main__":
    kind, N, NICE = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); videos = sys.argv[4:]
    stop, counter = mp.Event(), mp.Value("d", 0.0)
    term = []
    signal.signal(signal.SIGTERM, lambda *a: term.append(1))  # (stop.set() here could deadlock stop's own lock)
    ps = [mp.Process(target=child, args=(kind, i, videos, stop, counter)) for i in range(N)]
    t = time.perf_counter(); [p.start() for p in ps]
    dur = float(os.environ.get("LOAD_SECONDS", "0"))
    while not term and not (dur and time.perf_counter() - t > dur):
        time.sleep(0.2)
    stop.set()
    el = time.perf_counter() - t
    [p.join() for p in ps]
    unit = {"decode": "frames", "spin": "Mloops", "mem": "GB"}[kind]
    print(f"load {kind} x{N} nice {NICE}: {counter.value:.0f} {unit} in {el:.1f} s = {counter.value/el:.1f} {unit}/s, "
          f"{counter.value/el/N:.2f} per process", flush=True)
