"""Triton kernels for CUDA: a cross-entropy whose gradient overwrites the logits in place.

    available(device) -> (bool, reason)   a CUDA device of compute capability >= 7.0 and Triton importable
    cross_entropy(logits, targets, n_valid_cols) -> mean loss   (one launch forward, one backward)

Why: GPT-2's loss reads logits of 64 x 1024 rows x 50304 columns at micro batch 64 (6.6 GB in
bf16). PyTorch's cross-entropy needs a second 6.6 GB buffer for their gradient (eager, more: it
makes fp32 copies). Here the forward pass reads each row once (an online log-sum-exp) and keeps
one float per row; the backward pass reads the row again and writes (softmax - one_hot) * scale
over it. The logits are dead by then: lm_head's backward needs its input and weight, not its
output. So the gradient costs no memory, and the two passes move the least bytes they can:
read, read, write.

The math is F.cross_entropy(logits.float(), targets) over the first n_valid_cols columns; the
padding columns after them (the vocabulary is padded to 50304 for fast matmuls) get no
probability and a zero gradient, as GPT.forward's -inf mask gives them. The backward pass can
run once (the logits are gone after it), which is all training does.

Triton ships with PyTorch's CUDA builds; on other machines this module is imported but unused.
With TRITON_INTERPRET=1 set before triton is imported, the kernels run, slowly, on CPU tensors
(the tests do that; available() still says no for the CPU, so training never picks it there).
"""
import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

BLOCK_COLS = 4096  # columns one program reads at a time: 13 blocks per 50304-wide row
NUM_WARPS = 8

_kernels = None  # (forward, backward) once built: importing triton costs ~1 s, so only on first use


def available(device):
    """(True, "") when cross_entropy can run fast on this device, else (False, why not)."""
    if torch.device(device).type != "cuda":
        return False, f"Triton kernels need a CUDA device; this run is on {torch.device(device).type}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed (it ships with PyTorch's CUDA builds: pip install triton)"
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 0):  # Triton compiles for Volta and newer; on a Pascal GPU the first step would fail
        return False, f"Triton needs a GPU of compute capability 7.0 or newer; this one is {capability[0]}.{capability[1]}"
    return True, ""


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(logits_ptr, row_stride, targets_ptr, lse_ptr, loss_ptr, n_valid_cols,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row * row_stride passes 2**31 at micro batch 64
        row_ptr = logits_ptr + row * row_stride
        # One pass: per lane, a running max and a running sum of exp(x - max), merged at the end.
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
        lane_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_valid_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < n_valid_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(lane_max, x)
            # a lane that has seen only -inf keeps sum 0 (exp(-inf - -inf) would be nan)
            rescale = tl.where(new_max == float("-inf"), 0.0, tl.exp(lane_max - new_max))
            lane_sum = lane_sum * rescale + tl.where(new_max == float("-inf"), 0.0, tl.exp(x - new_max))
            lane_max = new_max
        row_max = tl.max(lane_max, axis=0)
        row_sum = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0)
        lse = row_max + tl.log(row_sum)
        target = tl.load(targets_ptr + row)
        target_logit = tl.load(row_ptr + target).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, lse - target_logit)

    @triton.jit
    def backward_kernel(logits_ptr, row_stride, targets_ptr, lse_ptr, scale_ptr, n_valid_cols, n_cols,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        lse = tl.load(lse_ptr + row)
        target = tl.load(targets_ptr + row)
        scale = tl.load(scale_ptr)  # d(loss)/d(mean) / rows, on the device: no host sync
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < n_cols
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            grad = tl.where(cols < n_valid_cols, grad, 0.0) * scale
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)  # over the logits

    return forward_kernel, backward_kernel


class _CrossEntropyInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, n_valid_cols):
        global _kernels
        if _kernels is None:
            _kernels = _build()
        forward_kernel, _ = _kernels
        rows = logits.view(-1, logits.size(-1))
        targets = targets.reshape(-1)
        lse = torch.empty(rows.size(0), dtype=torch.float32, device=rows.device)
        losses = torch.empty_like(lse)
        forward_kernel[(rows.size(0),)](rows, rows.stride(0), targets, lse, losses, n_valid_cols,
                                        BLOCK=BLOCK_COLS, num_warps=NUM_WARPS)
        ctx.save_for_backward(rows, targets, lse)
        ctx.n_valid_cols = n_valid_cols
        ctx.shape = logits.shape
        return losses.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        rows, targets, lse = ctx.saved_tensors
        _, backward_kernel = _kernels
        scale = (grad_loss.float() / rows.size(0)).reshape(1)
        backward_kernel[(rows.size(0),)](rows, rows.stride(0), targets, lse, scale, ctx.n_valid_cols,
                                         rows.size(1), BLOCK=BLOCK_COLS, num_warps=NUM_WARPS)
        return rows.view(ctx.shape), None, None


@torch.compiler.disable  # torch.compile runs the model up to the logits, then these kernels as they are
def cross_entropy(logits, targets, n_valid_cols):
    """Mean cross-entropy of logits (..., V) over their first n_valid_cols columns against targets
    (...), all ids < n_valid_cols. After backward() the logits tensor holds its gradient, so the
    caller must not read the logits again; GPT.forward returns None for them on this path."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return _CrossEntropyInPlace.apply(logits, targets, n_valid_cols)
