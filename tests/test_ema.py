"""The weights' moving average (fastvae/ema.py): LitEma's warm-up and update, written out by hand in
float64; its state by parameter name. (In a run, checkpointed and resumed: tests/test_kl_autoencoder.py.)"""

import torch
from torch import nn

from fastvae.ema import EMA


def test_each_update_is_litemas_in_float64():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    ema = EMA(model, 0.9)
    shadow = {name: p.detach().clone() for name, p in model.named_parameters()}
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        updates = n + 1  # LitEma counts updates from 1
        decay = min(0.9, (1 + updates) / (10 + updates))
        for name, p in model.named_parameters():
            shadow[name] = shadow[name] - (1 - decay) * (shadow[name] - p.detach())
    assert ema.updates == 5
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value, shadow[name], rtol=1e-12, atol=1e-12)


def test_frozen_weights_are_not_averaged_and_the_state_loads_back():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    ema = EMA(model, 0.5)
    assert set(ema.state_dict()) == {"1.weight", "1.bias"}
    state = {k: v + 1 for k, v in ema.state_dict().items()}
    ema.load_state_dict(state, updates=7)
    assert ema.updates == 7 and all(torch.equal(ema.state_dict()[k], state[k]) for k in state)
