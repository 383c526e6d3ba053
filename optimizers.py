"""The optimizer of a run: AdamW over every parameter (the GPT-2 recipe), or Muon for the blocks' matrices with
AdamW for the rest (--optimizer muon), stepped as one optimizer whose state dict is torch.optim's format, so
checkpoints, full_state's gathering and sending (DDP, FSDP, no shared disk) and --init_from_optimizer treat both
alike.

    OPTIMIZERS, NAMES                            ("adamw", "muon"), for --optimizer; their names for people
    build(model, "muon", lr=6e-4, weight_decay=0.1, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.0)
    set_lr(optimizer, lr)                        the schedule's LR; Muon's groups get theirs scaled (muon_lr / lr)
    kind_of_state(state_dict) -> "adamw" | "muon" | None    which optimizer wrote a stored state
    describe(optimizer) -> str                   one line: what steps which parameters, at what LR

torch.optim.Muon (PyTorch 2.9 on) takes 2-D parameters only: it orthogonalises each matrix's Nesterov momentum
with five Newton-Schulz iterations in bf16, scales the step by sqrt(max(1, rows / columns)) (Keller Jordan's
convention, its adjust_lr_fn=None) and decays weights by lr * weight_decay. Here it gets the attention and MLP
matrices of every block; the embeddings (wte, tied to the head, and wpe), biases and layer norms stay with AdamW,
as Muon's authors prescribe: an embedding is a lookup table, not a linear map, so orthogonalising its update has
no meaning.
"""
import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

OPTIMIZERS = ("adamw", "muon")
NAMES = {"adamw": "AdamW", "muon": "Muon and AdamW"}  # for people: log lines, `checkpoint.py inspect`
MUON_LR = 0.02        # --muon_lr: the best of 0.005-0.04 for GPT-2 124M on one H200 (docs/PERFORMANCE.md, Muon)
MUON_MOMENTUM = 0.95  # torch's default; --muon_momentum


class MuonWithAdamW:
    """torch.optim.Muon over some parameters and torch.optim.AdamW over the others, as one optimizer: one
    param_groups list (AdamW's groups, then Muon's), one step, and one state dict numbered the way a single
    torch optimizer over these groups numbers it (AdamW's parameters 0..n-1, Muon's from n), so that code which
    knows torch.optim's format only (full_state.py, checkpoint.py) needs nothing else."""

    def __init__(self, adamw, muon, muon_lr_scale):
        self.adamw, self.muon = adamw, muon
        self.muon_lr_scale = muon_lr_scale  # not in the groups: a resume with another --muon_lr applies it
        self.defaults = adamw.defaults  # "fused": whether AdamW's kernel is the fused one

    @property
    def param_groups(self):
        # Built on every read: load_state_dict gives the inner optimizers new group dicts.
        return self.adamw.param_groups + self.muon.param_groups

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        self.adamw.step()
        self.muon.step()

    def state_dict(self):
        state, groups, offset = {}, [], 0
        for inner in (self.adamw, self.muon):
            saved = inner.state_dict()
            state.update({index + offset: entry for index, entry in saved["state"].items()})
            groups += [{**group, "params": [index + offset for index in group["params"]]}
                       for group in saved["param_groups"]]
            offset += sum(len(group["params"]) for group in saved["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or kind_of_state(state_dict) != "muon":
            raise ValueError(f"an optimizer state of {len(groups)} groups ({kind_of_state(state_dict)}) does not "
                             f"map onto Muon with AdamW's {len(self.param_groups)}")
        split = len(self.adamw.param_groups)
        for inner, mine in ((self.adamw, groups[:split]), (self.muon, groups[split:])):
            # torch maps a stored state to the parameters by position in the groups: the indices only name them.
            indices = {index for group in mine for index in group["params"]}
            inner.load_state_dict({"state": {i: e for i, e in state_dict["state"].items() if i in indices},
                                   "param_groups": mine})


def adamw(groups, lr):
    """AdamW over groups with the settings of GPT.configure_optimizer (model.py lifts out alone, so it keeps its
    own copy; a test holds the two equal): GPT-2's betas, fused where the kernel exists, else for-each."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def build(model, optimizer="adamw", *, lr, weight_decay, muon_lr=MUON_LR, muon_momentum=MUON_MOMENTUM,
          muon_weight_decay=0.0):
    """The run's optimizer over a GPT's parameters (unwrapped; FSDP2's sharded parameters are fine for AdamW).
    adamw: GPT.optimizer_groups' two groups, decay on 2-D tensors only. muon: Muon at muon_lr for the 2-D weights
    of the blocks, and AdamW at lr for the rest in the same two groups (the embeddings decayed, biases and layer
    norms not). lr and muon_lr are the peaks; set_lr applies the schedule to both."""
    if optimizer == "adamw":
        return model.configure_optimizer(weight_decay, lr)  # the recipe's, unchanged
    if optimizer != "muon":
        raise ValueError(f"optimizer {optimizer!r} is not one of {OPTIMIZERS}")
    matrices = [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]
    taken = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    muon = torch.optim.Muon(matrices, lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay)
    return MuonWithAdamW(adamw(groups, lr), muon, muon_lr / lr if lr > 0 else 0.0)


def set_lr(optimizer, lr):
    """The schedule's LR for this step: AdamW's groups take it as it is, Muon's scaled by muon_lr / max_lr, so
    both warm up and decay on the same curve."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if isinstance(optimizer, MuonWithAdamW):
        for group in optimizer.muon.param_groups:
            group["lr"] = lr * optimizer.muon_lr_scale


def kind_of_state(state_dict):
    """Which optimizer wrote a stored state dict: "muon" (a group holds Muon's Newton-Schulz settings), "adamw"
    (every group has AdamW's betas: this trainer's and nanoGPT's files), or None (something else, or nothing)."""
    groups = (state_dict or {}).get("param_groups") if isinstance(state_dict, dict) else None
    if not groups:
        return None
    if any("ns_steps" in group for group in groups):
        return "muon"
    return "adamw" if all("betas" in group for group in groups) else None


def describe(optimizer):
    """One line for the log and `checkpoint.py inspect`'s reader: which optimizer steps what."""
    def count(groups):
        return sum(p.numel() for group in groups for p in group["params"]) / 1e6

    if not isinstance(optimizer, MuonWithAdamW):
        return f"optimizer: AdamW over all {count(optimizer.param_groups):.2f}M parameters"
    group = optimizer.muon.param_groups[0]
    return (f"optimizer: Muon (peak lr {group['lr']:g}, momentum {group['momentum']:g}, weight decay "
            f"{group['weight_decay']:g}) for the blocks' {len(group['params'])} matrices, "
            f"{count(optimizer.muon.param_groups):.2f}M parameters; AdamW for the embeddings, biases and layer norms, "
            f"{count(optimizer.adamw.param_groups):.2f}M")
