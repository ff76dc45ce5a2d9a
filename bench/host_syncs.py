"""Count the operations in a block of code that make the host wait for the device (host syncs).

On a GPU, torch.cuda.set_sync_debug_mode("warn") reports every synchronising CUDA call, and that is what
count() uses there. On the CPU nothing synchronises, so count() instead records, under a TorchDispatchMode,
the operations that would on a GPU: reading a device value on the host (.item(), .tolist(), bool(), the
data-dependent shapes of nonzero / masked_select / unique) and building a tensor from host data
(torch.tensor(...) or indexing with a Python list: a blocking host-to-device copy on a GPU). Compiled code
cannot run under a dispatch mode (fullgraph=True refuses it), so on the CPU it runs eagerly inside the block:
the ops counted are those the compiled graph holds.

    with count(device) as syncs:
        train_step(...)
    print(len(syncs), syncs)   # op names (CPU) or warning messages (CUDA)
"""
import contextlib
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NEEDS_HOST = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
              "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "histc", "equal",
              "is_nonzero", "allclose", "lift_fresh", "lift_fresh_copy"}


class _Recorder(TorchDispatchMode):
    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in NEEDS_HOST and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count(device):
    """Yields a list that fills with one entry per host sync made inside the block."""
    found = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # the first use of the mode also warns that it is a prototype: that notice is not a sync
        found += [str(w.message).splitlines()[0] for w in caught
                  if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message)]
    else:  # .tolist() and .numpy() read CPU memory without dispatching an op: watch them directly
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def watched(name):
            def read(self, *args, **kwargs):
                found.append(f"Tensor.{name}")
                return originals[name](self, *args, **kwargs)
            return read

        try:
            for name in originals:
                setattr(torch.Tensor, name, watched(name))
            with eager_compiled_code(), _Recorder(found):
                yield found
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)


def eager_compiled_code():
    """Compiled functions run eagerly inside: torch.compiler.set_stance (torch >= 2.6), else dynamo disabled."""
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return torch._dynamo.config.patch(disable=True)
