"""The model's loss paths: the chunked linear + cross-entropy (--loss_chunk_rows) and the Triton
kernels (--fused_loss, run through Triton's interpreter on the CPU, see conftest) must be the plain
loss, values and gradients, and neither returns the full logits."""
import importlib.util

import pytest
import torch

from model import GPT, GPTConfig

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton is not installed: pip install triton (CI does)")
# uneven chunks, exact, all rows, more than all rows; then the Triton kernels
def chunked(rows):
    return dict(loss="chunked", loss_chunk_rows=rows)


LOSS_PATHS = [chunked(7), chunked(32), chunked(96), chunked(1000),
              pytest.param(dict(loss="fused"), marks=needs_triton, id="fused")]


def loss_and_grads(model, idx, targets, autocast_dtype=None, **options):
    model.zero_grad()
    model.set_run_options(**options)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))  # vocabulary padded to 50304
    idx = torch.randint(0, 50257, (3, 32))
    targets = torch.randint(0, 50257, (3, 32))
    return model, idx, targets


@pytest.mark.parametrize("path", LOSS_PATHS)
def test_loss_path_equals_plain_cross_entropy_in_fp32(batch, path):
    model, idx, targets = batch
    plain_logits, plain_loss, plain_grads = loss_and_grads(model, idx, targets)
    logits, loss, grads = loss_and_grads(model, idx, targets, **path)
    assert plain_logits is None and logits is None  # with targets, forward returns the loss alone, whichever way
    assert torch.allclose(loss, plain_loss, rtol=1e-6)
    for name, grad in grads.items():
        assert (grad - plain_grads[name]).norm() <= 1e-5 * plain_grads[name].norm(), name


@pytest.mark.parametrize("path", [chunked(16), LOSS_PATHS[-1]])
def test_loss_path_under_bf16_autocast_is_within_bf16_rounding(batch, path):
    model, idx, targets = batch
    _, plain_loss, plain_grads = loss_and_grads(model, idx, targets, torch.bfloat16)
    _, loss, grads = loss_and_grads(model, idx, targets, torch.bfloat16, **path)
    assert torch.allclose(loss, plain_loss, rtol=1e-3)
    for name, grad in grads.items():
        assert (grad - plain_grads[name]).norm() <= 1e-2 * plain_grads[name].norm(), name


@pytest.mark.parametrize("path", [chunked(10), LOSS_PATHS[-1]])
def test_loss_path_without_grad_gives_the_same_value(batch, path):
    model, idx, targets = batch
    with torch.no_grad():
        _, plain = model(idx, targets)
        model.set_run_options(**path)
        logits, other = model(idx, targets)
    assert logits is None and torch.allclose(plain, other, rtol=1e-6)


def test_logits_without_targets_mask_the_padding_and_match_the_loss(batch):
    model, idx, targets = batch
    with torch.no_grad():
        logits, none = model(idx)
        _, loss = model(idx, targets)
    assert none is None and torch.isneginf(logits[..., 50257:]).all() and torch.isfinite(logits[..., :50257]).all()
    expected = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_config_fields_older_files_lack_get_the_defaults_they_computed_with():
    from model import config_from_dict

    old = dict(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)  # a format-1 checkpoint's model_config
    config = config_from_dict(old)
    assert (config.real_vocab_size, config.gelu) == (50257, "tanh")
    assert config_from_dict(dict(old, vocab_size=96)).real_vocab_size == 96  # a small vocabulary: every row is a token
