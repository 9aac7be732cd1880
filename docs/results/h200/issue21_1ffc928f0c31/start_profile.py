"""Where a pipeline's start goes (runner, workers' server, decoder plan, workers, graph capture), as the job's
pipeline process does it: timed steps, then cProfile of Pipeline.start."""
import cProfile, pstats, time, logging, sys, os
sys.path.insert(0, os.getcwd())
logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)6.0f %(threadName)s %(name)s %(message)s")
for n in ("PIL", "matplotlib", "torch"):
    logging.getLogger(n).setLevel(logging.WARNING)
T = time.perf_counter()
def say(what): print(f"{time.perf_counter() - T:7.2f} {what}", flush=True)
def main():
    import torch; say("torch imported")
    from iv2trt.decode.workers import start_worker_server
    th = start_worker_server() if "--early" in sys.argv else None; say("server thread started" if th else "no early server")
    from iv2trt.job.settings import InferSettings
    from iv2trt.job.factory import SettingsRunner
    from iv2trt.job.pipeline import JobOptions, Pipeline
    from iv2trt.decode.clips import Windowing
    s = InferSettings(inputs=["x"], output="/tmp/x", backend="torch", random_init=True)
    r = SettingsRunner(s)(); say("runner built")
    class Sink:
        def finished(self, *a): pass
        def failed(self, *a): pass
    o = JobOptions(Windowing(8, window_seconds=2.0), 224, 32, None, 120.0, False, "auto", 8, cpu_share=0.5)
    p = Pipeline(r, o, Sink(), name="gpu0")
    pr = cProfile.Profile(); pr.enable()
    p.start(); say("pipeline started")
    pr.disable()
    p.close(); say("closed")
    pstats.Stats(pr, stream=sys.stdout).sort_stats("cumulative").print_stats(35)
if __name__ == "__main__":
    main()
