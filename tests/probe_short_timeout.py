"""Run by test_linear_probe.py under torchrun: linear_probe.py whose collectives time out after 3 s, and whose rank 0
spends 5 s more on the first dataset's heads, so that any rank left waiting in a collective while rank 0 works
alone fails, on any machine (a count of seconds slept, not a measured time)."""
import datetime
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import linear_probe  # noqa: E402
import minimal_vit_inet as mvi  # noqa: E402

init = dist.init_process_group  # minimal_vit_inet.setup_distributed passes timeout=60 min: 3 s here instead
dist.init_process_group = lambda *args, **kwargs: init(*args, **{**kwargs, "timeout": datetime.timedelta(seconds=3)})
evaluate, calls = linear_probe.evaluate, []


def slow_first_heads(*args, **kwargs):  # rank 0's heads: the first dataset's take 5 s longer than the timeout
    calls.append(1)
    if len(calls) == 1:
        time.sleep(5)
    return evaluate(*args, **kwargs)


linear_probe.evaluate = slow_first_heads
mvi.run(linear_probe.main, linear_probe.parse_config(sys.argv[1:]))
