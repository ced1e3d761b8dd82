"""Protected mass: each token keeps its top experts up to keep_mass of their router probability;
only its light slots move, onto experts the batch loads anyway."""

import pytest
import torch

from lynx_compile import LynxConfig, LynxOptionsError, policies


def logits_of(rows) -> torch.Tensor:
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def test_a_dominant_top1_lends_its_light_slot_and_a_split_token_keeps_both():
    # E = 4, k = 2. Token 0: 0.70 / 0.20 (top-1 holds 78% of its top-2): its second slot is light.
    # Token 1: 0.45 / 0.45 on experts 2, 3: split, keeps both. Token 2: 0.9 on expert 2.
    probs = [[0.70, 0.20, 0.05, 0.05], [0.05, 0.05, 0.45, 0.45], [0.02, 0.03, 0.90, 0.05]]
    logits = logits_of(probs)
    scores = torch.softmax(logits, -1)
    _, indices = policies.select("protected_mass", scores, logits, 2, keep_mass=0.75)
    assert sorted(indices[1].tolist()) == [2, 3]  # split: both protected
    assert indices[0, 0] == 0 and indices[0, 1] in (2, 3)  # expert 1 dropped for a loaded one
    assert indices[2, 0] == 2  # its top-1
    used = torch.unique(indices).tolist()
    assert 1 not in used and len(used) < len(torch.unique(torch.topk(scores, 2).indices))


@pytest.mark.parametrize("keep_mass", [0.3, 0.8, 1.0])
def test_every_token_keeps_its_top1_and_keep_mass_one_is_plain_top_k(keep_mass):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 16, generator=generator) * 2
    scores = torch.softmax(logits, -1)
    plain = torch.topk(scores, 4).indices
    _, indices = policies.select("protected_mass", scores, logits, 4, keep_mass=keep_mass)
    assert torch.equal(indices[:, 0], plain[:, 0])
    if keep_mass == 1.0:
        assert torch.equal(indices.sort(-1).values, plain.sort(-1).values)


def test_the_option_is_validated_and_defaulted():
    assert LynxConfig(policy="protected_mass").site_setting("g", 8, 2).params_dict() == {"keep_mass": 0.8}
    for bad in (0, 1.5, "most"):
        with pytest.raises(LynxOptionsError, match="keep_mass"):
            LynxConfig(policy="protected_mass", keep_mass=bad)
