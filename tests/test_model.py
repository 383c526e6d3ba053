"""The model's loss paths: the chunked linear + cross-entropy must be the plain loss, values and gradients."""
import pytest
import torch

from train_gpt2 import GPT, GPTConfig


def loss_and_grads(model, idx, targets, chunk_rows, autocast_dtype=None):
    model.zero_grad()
    model.loss_chunk_rows = chunk_rows
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))
    idx = torch.randint(0, 50257, (3, 32))
    targets = torch.randint(0, 50257, (3, 32))
    return model, idx, targets


@pytest.mark.parametrize("chunk_rows", [7, 32, 96, 1000])  # uneven, exact, all rows, more than all rows
def test_chunked_loss_equals_plain_cross_entropy_in_fp32(batch, chunk_rows):
    model, idx, targets = batch
    plain_logits, plain_loss, plain_grads = loss_and_grads(model, idx, targets, 0)
    logits, loss, grads = loss_and_grads(model, idx, targets, chunk_rows)
    assert plain_logits is not None and logits is None  # the point: no full logits
    assert torch.allclose(loss, plain_loss, rtol=1e-6)
    for name, grad in grads.items():
        assert (grad - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name


def test_chunked_loss_under_bf16_autocast_is_within_bf16_rounding(batch):
    model, idx, targets = batch
    _, plain_loss, plain_grads = loss_and_grads(model, idx, targets, 0, torch.bfloat16)
    _, loss, grads = loss_and_grads(model, idx, targets, 16, torch.bfloat16)
    assert torch.allclose(loss, plain_loss, rtol=1e-3)
    for name, grad in grads.items():
        assert (grad - plain_grads[name]).norm() <= 1e-2 * plain_grads[name].norm(), name


def test_chunked_loss_without_grad_gives_the_same_value(batch):
    model, idx, targets = batch
    model.loss_chunk_rows = 0
    with torch.no_grad():
        _, plain = model(idx, targets)
        model.loss_chunk_rows = 10
        _, chunked = model(idx, targets)
    assert torch.allclose(plain, chunked, rtol=1e-6)
