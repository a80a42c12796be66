import pytest
import torch

from cmpq.calib.gradients import output_gradient_energy
from cmpq.models.graph import quantizable_linears

from tiny import make_tiny_model, tiny_batch


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_gradient_energy_matches_autograd_on_the_outputs(arch):
    model = make_tiny_model(arch)
    windows = tiny_batch(3, 16)
    found = output_gradient_energy(model, windows, progress=False)
    linears = quantizable_linears(model)
    assert set(found) == set(linears)

    # reference: the outputs kept by forward hooks, differentiated by torch.autograd.grad
    # with every parameter requiring gradients (no hooks on tensors, no leaf trick)
    sums = dict.fromkeys(linears, 0.0)
    energies = dict.fromkeys(linears, 0.0)
    for window in windows:
        outputs, inputs = {}, {}
        handles = [
            module.register_forward_hook(
                lambda _m, i, out, n=name, kept=outputs, seen=inputs: (
                    kept.__setitem__(n, out),
                    seen.__setitem__(n, i[0].detach()),
                )[0]
            )
            for name, module in linears.items()
        ]
        ids = window.unsqueeze(0)
        loss = model(ids, labels=ids).loss
        for handle in handles:
            handle.remove()
        names = list(outputs)
        gradients = torch.autograd.grad(loss, [outputs[n] for n in names])
        for name, gradient in zip(names, gradients, strict=True):
            token_energy = inputs[name].double().square().sum(-1).flatten()
            per_token = gradient.double().square().sum(-1).flatten()
            sums[name] += float((per_token * token_energy).sum())
            energies[name] += float(token_energy.sum()) * gradient.shape[-1]
    model.zero_grad(set_to_none=True)
    for name in linears:  # Σ_t ‖g_t‖² ‖x_t‖² / (out · Σ_t ‖x_t‖²)
        assert found[name] == pytest.approx(sums[name] / energies[name], rel=1e-5)
    assert max(found.values()) > 0


def test_output_gradient_energy_leaves_the_parameters_as_they_were():
    model = make_tiny_model("qwen2")
    model.get_submodule("model.layers.0.mlp.down_proj").weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    output_gradient_energy(model, tiny_batch(2, 8), progress=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
