"""Where creating the torch runner on the GPU spends its time (the CLI's 10 s between model and runner)."""
import cProfile, pstats, time, logging, sys, os
sys.path.insert(0, os.getcwd())
t = time.perf_counter()
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)6.0f %(name)s %(message)s")
import torch
print("torch import %.2f" % (time.perf_counter() - t))
t = time.perf_counter(); torch.cuda.init(); torch.zeros(1, device="cuda"); print("cuda init %.2f" % (time.perf_counter() - t))
from iv2trt.job.settings import InferSettings
from iv2trt.job.factory import SettingsRunner, describe_runner
s = InferSettings(inputs=["x"], output="/tmp/x", backend="torch", random_init=True)
pr = cProfile.Profile(); pr.enable()
t = time.perf_counter(); r = SettingsRunner(s)(); print("runner %.2f" % (time.perf_counter() - t))
t = time.perf_counter(); info = describe_runner(r, s, 8); print("describe %.2f" % (time.perf_counter() - t))
pr.disable()
pstats.Stats(pr, stream=sys.stdout).sort_stats("cumulative").print_stats(45)
