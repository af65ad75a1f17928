"""Our model on a random release written by random_release.write_release."""
import os

import torch

from model import ModelArgs, Transformer


def fixture_model(path, weights: dict, dtype: str, backend: str, device, max_seq_len: int,
                  max_batch_size: int) -> Transformer:
    """model.py built on `device` from the config.json of the release at path, loaded with the
    state dict write_release returned."""
    args = ModelArgs.from_file(os.path.join(path, "config.json"), dtype=dtype, backend=backend,
                               max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device(device):
        model = Transformer(args)
    model.load_state_dict(weights, strict=True)
    return model
