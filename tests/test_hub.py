"""hub.py: Hub reachability and pushing a finished model folder."""

from __future__ import annotations

import pytest

from captioner.errors import CaptionerError
from captioner.hub import push_to_hub


def test_push_fails_with_one_line_offline_or_without_a_model(tiny_model_dir, tmp_path):
    with pytest.raises(CaptionerError, match="not a model directory"):
        push_to_hub(tmp_path, "someone/model")
    with pytest.raises(CaptionerError, match="Hub is unreachable"):
        push_to_hub(tiny_model_dir, "someone/model")  # HF_HUB_OFFLINE=1 in conftest
