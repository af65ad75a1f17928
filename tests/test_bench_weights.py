"""bench.py's weights, memory and rank-share pieces on the CPU: the random weights are the same numbers
held either way, the memory table's shares follow the models and convert.py's rules, and a graph
holds what it reads."""
import contextlib
import dataclasses
import gc
import os
import weakref

import torch

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "config_tiny.json")


def test_fp8_and_bf16_models_hold_the_same_random_numbers():
    prompt = torch.randint(0, 129280, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for weights in ("fp8", "bf16"):
        model = bench.build_filled(TINY, 3, weights, 2, 64, device="cpu", backend="torch")
        assert (model.layers[2].ffn.experts[1].w2.weight.dtype == torch.int8) == (weights == "fp8")
        with torch.no_grad():
            logits[weights] = model(prompt, 0)
    assert torch.equal(logits["fp8"], logits["bf16"])


def test_the_quantised_layout_of_a_triton_model_is_read_on_the_meta_device():
    """bench.py weights builds its models with backend triton; the twin that only tells which weights
    are quantised is built on the meta device, where only the torch backend runs (seen failing on a GPU)."""
    from model import ModelArgs
    from parallel import Parallel
    args = ModelArgs.from_file(TINY, n_layers=2, n_mtp_layers=0, backend="triton")
    args.compress_ratios = args.compress_ratios[:2]
    layout = bench.lowp_layout(args, Parallel())
    assert layout["layers.1.ffn.experts.0.w1.weight"] == "fp4" and layout["layers.0.attn.wq_b.weight"] == "fp8"

def test_rank_share_holds_rank_0s_part():
    whole = bench.build_filled(TINY, 2, "fp8", 1, 32, device="cpu", backend="torch")
    share = bench.build_filled(TINY, 2, "fp8", 1, 32, bench.RankShare(2, 2), device="cpu", backend="torch")
    assert share.layers[0].attn.wq_b.weight.shape[0] * 2 == whole.layers[0].attn.wq_b.weight.shape[0]
    assert sum(e is not None for e in share.layers[0].ffn.experts) == 4
    assert torch.equal(share.layers[0].ffn.experts[3].w1.weight, whole.layers[0].ffn.experts[3].w1.weight)


def test_memory_shares_of_the_real_configs():
    configs = bench.real_configs()
    flash = configs["V4-Flash"][0]
    sizes = {}
    for weights, experts in (("bf16", "bf16"), ("fp8", "fp4")):
        args = dataclasses.replace(flash, weights=weights, expert_weights=experts)
        sizes[weights] = bench.share_bytes(args, 4, bench.share_bytes(args, 1)[2])[0]
    assert sizes["fp8"] / bench.GB < 45 and 0.26 < sizes["fp8"] / sizes["bf16"] < 0.3
    pro = dataclasses.replace(configs["V4-Pro"][0], weights="fp8", expert_weights="fp4")
    size, why, _ = bench.share_bytes(pro, 16, bench.share_bytes(pro, 1)[2])
    assert size is None and why == "layers.0.ffn.shared_experts.w1.weight: 192 rows a rank"
    assert bench.share_bytes(flash, 3)[1] == "n_heads=64 is not divisible by the world size 3"


def test_a_graph_holds_what_it_reads(monkeypatch):
    """bench.Graphed keeps fn, and so the tensors only fn's closure holds, alive as long as the graph:
    LayerSteps once lost its input streams and token ids that way (their memory reused under the graph,
    the hash routing read garbage ids). CUDA graph capture is faked so that this runs on the CPU."""
    class FakeGraph:
        def replay(self):
            pass
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())

    def capture():
        inputs = torch.zeros(4)
        return bench.Graphed(lambda: inputs.add_(1)), weakref.ref(inputs)

    replay, inputs = capture()
    gc.collect()
    assert inputs() is not None and inputs().tolist() == [2.0] * 4     # the warm-up call and the capture ran fn
    replay()
    del replay
    gc.collect()
    assert inputs() is None
