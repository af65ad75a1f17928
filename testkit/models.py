"""Our models on the random releases the tests write: model.py on random_release.write_release's,
model_v3.py on testkit/release_v3.write_release_v3's (DeepSeek-R1's format)."""
import os

import torch

import model_v3
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


def fixture_model_v3(path, weights: dict, dtype: str, backend: str, device, max_seq_len: int,
                     max_batch_size: int) -> model_v3.Transformer:
    """model_v3.py built on `device` from the config.json of the R1-format release at path, loaded
    with the values write_release_v3 returned (Hugging Face names, renamed by model_v3.release_name;
    the MTP layer left out, as convert.py leaves it)."""
    args = model_v3.ModelArgs.from_file(os.path.join(path, "config.json"), dtype=dtype, backend=backend,
                                        max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device(device):
        model = model_v3.Transformer(args)
    state = {}
    for name, value in weights.items():
        ours = model_v3.release_name(name, args.n_layers)
        if ours is not None:
            state[ours] = value
    model.load_state_dict(state, strict=True)
    return model
