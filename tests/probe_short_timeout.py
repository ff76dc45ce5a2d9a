"""Run by test_linear_probe.py under torchrun: linear_probe.py whose collectives time out after 3 s, so that
any rank left waiting in a collective while another works alone (preparing data, training heads) fails."""
import datetime
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import linear_probe  # noqa: E402
import minimal_vit_inet as mvi  # noqa: E402

init = dist.init_process_group  # minimal_vit_inet.setup_distributed passes timeout=60 min: 3 s here instead
dist.init_process_group = lambda *args, **kwargs: init(*args, **{**kwargs, "timeout": datetime.timedelta(seconds=3)})
mvi.run(linear_probe.main, linear_probe.parse_config(sys.argv[1:]))
