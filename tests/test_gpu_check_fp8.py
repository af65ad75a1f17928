"""tools/gpu_check_fp8.parted_at_ties, the rule under which greedy tokens of FP8 and BF16 shards may part."""
import torch

from tools.gpu_check_fp8 import parted_at_ties


def test_parted_at_ties_accepts_only_gaps_within_bf16_rounding():
    g = torch.Generator().manual_seed(5)
    reference = torch.randn(2, 6, 50, generator=g) * 4                  # float32 logits [b, steps + 1, vocab]
    bf16 = reference + torch.randn(reference.shape, generator=g) * 0.01   # within 0.05 of float32 here
    tokens = bf16.argmax(-1)[:, :-1]
    fp8 = bf16.clone()
    assert parted_at_ties(fp8, bf16, reference, tokens) == []
    bound = {}
    for row, step, gap in ((0, 2, 0.003), (1, 4, 0.5)):               # a tie, then a real difference
        first, second = bf16[row, step].topk(2).indices.tolist()
        shift = bf16[row, step, first] - gap - bf16[row, step, second]
        bf16[row, step, second] += shift                                # float32 moves with it
        reference[row, step, second] += shift
        fp8[row, step] = bf16[row, step]
        fp8[row, step, second] += 2 * gap                               # the FP8 shards prefer the second
        bound[row, step] = 2 * (bf16[row, step] - reference[row, step]).abs().max().item()
        assert gap < 0.04 < bound[row, step] < 0.5 or gap == 0.5
    places = parted_at_ties(fp8, bf16, reference, tokens)
    assert [(r, s, tie) for r, s, _, _, tie in places] == [(0, 2, True), (1, 4, False)]
    for r, s, gap, b, _ in places:
        assert abs(gap - (0.003 if r == 0 else 0.5)) < 1e-5 and b == bound[r, s]
    tokens[0, 3] = (tokens[0, 3] + 1) % 50       # where the tokens themselves were not the bf16 logits' pick
    assert [(r, s) for r, s, *_ in parted_at_ties(fp8, bf16, reference, tokens)] == [(0, 2), (0, 3), (1, 4)]
