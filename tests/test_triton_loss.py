"""The Triton loss (triton_loss.py), run on CPU tensors through Triton's interpreter (set in conftest):
the same values and gradients as PyTorch's cross-entropy, with the gradient written over the logits.
Through the whole model: tests/test_model.py."""
import pytest
import torch
import torch.nn.functional as F

import device
import train_gpt2
from conftest import TINY_RUN
from model import GPT, GPTConfig, MODEL_PRESETS

pytest.importorskip("triton", reason="Triton is not installed: pip install triton (CI does)")
import triton_loss  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_overwrites_the_logits_and_padding_gets_none(monkeypatch, dtype):
    monkeypatch.setattr(triton_loss, "BLOCK_COLS", 16)  # rows of 4 blocks, the last one partly padding
    torch.manual_seed(1)
    n_valid, width = 50, 64
    source = (torch.randn(3, 5, width) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, n_valid, (3, 5))
    targets[0, 0] = n_valid - 1  # the last real column
    logits = source * 1  # not a leaf, as lm_head's output
    seen = {}
    logits.register_hook(lambda grad: seen.update(grad=grad))
    loss = triton_loss.cross_entropy(logits, targets, n_valid)
    (loss * 0.25).backward()  # an upstream scale, as gradient accumulation gives
    assert seen["grad"].data_ptr() == logits.data_ptr()  # no second logits-sized buffer

    reference = source.detach().float().requires_grad_()
    masked = reference.masked_fill(torch.arange(width) >= n_valid, float("-inf"))
    expected = F.cross_entropy(masked.view(-1, width), targets.view(-1))
    (expected * 0.25).backward()
    assert torch.allclose(loss.float(), expected, rtol=1e-5)
    tolerance = 1e-7 if dtype == torch.float32 else 2e-4  # the gradient is stored in the logits' dtype
    assert (source.grad.float() - reference.grad).abs().max() <= tolerance
    assert (source.grad[..., n_valid:] == 0).all()


def test_fused_loss_on_a_cpu_run_is_refused_before_anything_is_written(tmp_path, tiny_data, capsys):
    log_dir = tmp_path / "log"
    with pytest.raises(SystemExit) as exit_info:
        train_gpt2.main(TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(log_dir), "--fused_loss", "on"])
    assert exit_info.value.code == 1
    assert "--fused_loss on: Triton kernels need a CUDA device" in capsys.readouterr().err
    assert not log_dir.exists()


def test_fused_loss_auto_says_what_it_chose_on_the_cpu(tmp_path, tiny_data, capsys):
    train_gpt2.main(TINY_RUN + ["--data_root", str(tiny_data), "--log_dir", str(tmp_path), "--max_steps", "1",
                                "--total_batch_size", "128"])
    assert "loss: PyTorch cross-entropy (--fused_loss auto: Triton kernels need a CUDA device" in capsys.readouterr().out


def test_bench_loss_checks_the_kernels_against_pytorch_and_times_them():
    import re
    import subprocess
    import sys

    from conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "scripts.bench_loss", "--device", "cpu", "--rows", "16",
                             "--cols", "80", "--valid_cols", "70", "--check_rows", "8", "--blocks", "32:4", "--repeats", "1"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)  # TRITON_INTERPRET=1 comes from conftest
    assert result.returncode == 0, result.stderr
    check = re.search(r"loss ([\d.]+) vs PyTorch ([\d.]+); gradient max abs difference ([\d.e+-]+).*all zero: True",
                      result.stdout)
    assert check, result.stdout
    assert abs(float(check[1]) - float(check[2])) < 1e-4 and float(check[3]) < 1e-3
    assert "Triton, 32 columns per block, 4 warps:" in result.stdout and "PyTorch compiled:" in result.stdout


@pytest.mark.parametrize("capability, expected", [((9, 0), "fused"), ((6, 1), "torch")])
def test_fused_loss_auto_is_on_for_a_triton_capable_gpu_only(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    loss, line = device.choose_loss("auto", 0, torch.device("cuda"))
    assert loss == expected
    assert ("Triton kernels" if expected == "fused" else "compute capability 7.0 or newer; this one is 6.1") in line
    assert GPT(GPTConfig(**MODEL_PRESETS["d2"])).set_run_options(loss=loss).loss_kind == expected
