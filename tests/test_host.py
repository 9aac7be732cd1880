"""The machine's CPU shares over a run (job/host.py): busy, idle, stolen by a hypervisor, from /proc/stat."""
from __future__ import annotations

import logging

from iv2trt.job.host import cpu_shares, cpu_times, describe, warn_if_stolen

#        user nice system idle iowait irq softirq steal
BEFORE = (1000, 0, 200, 5000, 100, 0, 50, 0)
AFTER = (1700, 0, 300, 5200, 100, 0, 80, 60)


def test_shares_of_the_time_between_two_readings():
    spent = [b - a for a, b in zip(BEFORE, AFTER)]  # 700 user, 100 system, 200 idle, 30 softirq, 60 steal
    shares = cpu_shares(BEFORE, AFTER)
    assert shares == {"busy": round(830 / sum(spent), 3), "idle": round(200 / sum(spent), 3),
                      "steal": round(60 / sum(spent), 3)}
    assert cpu_shares(None, AFTER) is None and cpu_shares(BEFORE, BEFORE) is None


def test_readings_from_proc_stat_and_without_it(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1\n")
    assert cpu_times(str(stat)) == (1, 2, 3, 4, 5, 6, 7, 8)  # the guest times (inside user, nice) left out
    assert cpu_times(str(tmp_path / "missing")) is None
    stat.write_text("intr 1\n")
    assert cpu_times(str(stat)) is None
    here = cpu_times()  # this machine (Linux): ticks only grow
    assert here is None or all(b >= a for a, b in zip(here, cpu_times()))


def test_the_log_names_stolen_time_once_and_only_when_it_matters(caplog):
    calm = {"name": "gpu0", "machine_cpu": {"busy": 0.7, "idle": 0.3, "steal": 0.004}}
    robbed = {"name": "gpu0.1", "machine_cpu": {"busy": 0.6, "idle": 0.34, "steal": 0.06}}
    assert describe(calm["machine_cpu"]) == "; the machine's CPUs 70% busy, 30% idle"
    assert describe(robbed["machine_cpu"]) == "; the machine's CPUs 60% busy, 34% idle, 6% stolen by the hypervisor"
    assert describe(None) == ""
    with caplog.at_level(logging.WARNING, "iv2trt.job.host"):
        warn_if_stolen([calm, {"name": "cpu"}])
        assert caplog.records == []
        warn_if_stolen([calm, robbed])
    (record,) = caplog.records
    assert "gpu0.1: 6%" in record.getMessage() and "gpu0:" not in record.getMessage()
