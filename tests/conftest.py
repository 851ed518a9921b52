import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Tests run many tiny tensor ops: one intra-op thread is faster and avoids oversubscription when
# several processes share the 2 CI cores.
torch.set_num_threads(1)
