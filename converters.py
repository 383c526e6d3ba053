"""Checkpoints other GPT-2 trainers wrote: nanoGPT, build-nanogpt, llm.c.

Public API (checkpoint.py reads the files, safely, and hands these their contents):
    KINDS[kind]                            what each kind of file is called where users read it
    PICKLE_STAND_INS                       what checkpoint.load_file lets a pickle name: build-nanogpt's GPTConfig,
                                           read as a PickledConfig that runs nothing
    is_llmc_file(path) -> bool             an llm.c file (not a torch.save'd one), by its suffix or first number
    is_llmc_model(path) -> bool            an llm.c model file, by its first number (not its state or tokenizer files)
    detect(obj) -> "nanogpt" | "build-nanogpt" | None     whose checkpoint dict obj is
    convert(obj, path, kind, for_training=False) -> Foreign
    read_llmc(path) -> Foreign             llm.c's model files (gpt2_124M.bin, model_*.bin), fp32 or bf16
    write_llmc(model_or_state, model_config, path, dtype="fp32")   the other way, for llm.c's C/CUDA code
    Foreign                                what a file holds, in this trainer's terms; .build_model(device)
    ConverterError                         what cannot be read or mapped, and what to do instead

    foreign = checkpoint.read_foreign("out/ckpt.pt", for_training=True)
    for line in foreign.notes: print(line)
    model = foreign.build_model("cuda")

What each trainer writes, and what it computes:
    build-nanogpt  log/model_05000.pt: {'model', 'config' (its GPTConfig dataclass, pickled as
                   __main__.GPTConfig), 'step', 'val_loss'}; tanh GELU; no optimizer state.
    nanoGPT        out/ckpt.pt: {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'};
                   exact GELU (nn.GELU()); biases optional (bias=False), dropout while training.
    llm.c          256 int32 of header, then every parameter in a fixed order (llmc_layout), fp32 or bf16;
                   tanh GELU.
nanoGPT and build-nanogpt score all vocab_size logits (50304), padding rows included, so their models
convert with nothing masked (real_vocab_size = vocab_size); llm.c's softmax covers the real 50257
tokens only, so its padding rows are masked as this trainer's own are. Both torch trainers save the
weights after `step` / `iter_num` updates and resume at that step: Foreign.steps_done. This trainer's
checkpoints store the last completed step, steps_done - 1.
"""
import math
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import numpy as np
import torch

import files
from cli import UserError
from model import TIED_WEIGHTS, GPTConfig, ModelConfigError, config_from_dict, model_from_config, unwrap

KINDS = {"nanogpt": "nanoGPT checkpoint", "build-nanogpt": "build-nanogpt checkpoint", "llm.c": "llm.c model file"}
GPT2_TOKENS = GPTConfig.real_vocab_size  # 50257: GPT-2's BPE, the only tokenizer this trainer has
WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")  # DDP's and torch.compile's prefixes
# The causal mask some GPT versions register as a buffer named "bias" (and HF's masked_bias): not weights.
MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
PLAIN = (bool, int, float, str, type(None))
# build-nanogpt pickles its config class from the script it runs, i.e. from __main__; a user who
# imported that script from another one pickles it under the script's module name.
PICKLED_CONFIG_NAMES = ("__main__.GPTConfig", "train_gpt2.GPTConfig")
NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")  # build-nanogpt's whole GPTConfig

LLMC_MAGIC = 20240326
LLMC_DTYPES = {3: "fp32", 5: "bf16"}  # llm.c's versions with the padded vocabulary size in header[7]
LLMC_HEADER_BYTES = 256 * 4
# How each precision is stored: its torch dtype, then the torch and numpy types its bits are moved as (numpy
# has no bf16, so bf16's bits are read and written as int16).
LLMC_NUMBERS = {"fp32": (torch.float32, torch.float32, "<f4"), "bf16": (torch.bfloat16, torch.int16, "<i2")}
# Other llm.c files people pass by mistake: their first int32 says what they are.
LLMC_OTHER_MAGICS = {20240327: "llm.c's debug state (train_gpt2.py's write_state)", 20240328: "llm.c's tokenizer",
                     20240520: "an llm.c token shard (training data)"}


class ConverterError(UserError):
    """Another trainer's file that cannot be read, or a model this trainer cannot hold; the message
    names the file, what is wrong and what to do instead."""


@dataclass
class Foreign:
    """Another trainer's checkpoint in this trainer's terms."""
    kind: str                  # a key of KINDS
    path: Path
    tensors: dict              # our names (transformer.h.0.attn.c_attn.weight, ...), lm_head.weight included
    model_config: dict         # GPTConfig fields: model_from_config(model_config) holds the tensors
    steps_done: int = None     # optimizer updates the weights have had: training continues at this step
    val_loss: float = None     # build-nanogpt's last validation loss
    best_val_loss: float = None  # nanoGPT's
    optimizer: dict = None     # an AdamW state dict for GPT.optimizer_groups' two groups, or None
    run_config: dict = field(default_factory=dict)  # nanoGPT's 'config': the run's plain settings
    notes: list = field(default_factory=list)       # one line each, for the user

    def build_model(self, device="cpu"):
        """A GPT of model_config holding these weights, on device, in eval mode."""
        model = model_from_config(self.model_config)
        model.load_state_dict(self.tensors)  # copies; bf16 tensors of llm.c files become the model's fp32
        return model.to(device).eval()


class PickledConfig:
    """Stands in for build-nanogpt's GPTConfig dataclass while its checkpoint is unpickled: torch.load
    builds this instead of looking the class up, so nothing of the script that wrote the file is imported
    or run. It keeps the plain values of the pickled fields (block_size, vocab_size, ...) in .fields."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slot values) of a class with __slots__
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"GPTConfig's pickled state is a {type(state).__name__}, not its fields")
        self.fields = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, PLAIN)}

    def __repr__(self):
        return f"GPTConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).get('fields', {}).items())})"


PICKLE_STAND_INS = [(PickledConfig, name) for name in PICKLED_CONFIG_NAMES]


# -----------------------------------------------------------------------------
# nanoGPT and build-nanogpt: torch.save'd dicts


def detect(obj):
    """"nanogpt" or "build-nanogpt" for their checkpoint dicts; None for anything else (this trainer's
    own checkpoints carry format_version)."""
    if not isinstance(obj, dict) or "format_version" in obj or not isinstance(obj.get("model"), dict):
        return None
    if isinstance(obj.get("model_args"), dict):
        return "nanogpt"
    if isinstance(obj.get("config"), PickledConfig) and "step" in obj:
        return "build-nanogpt"
    return None


def convert(obj, path, kind, for_training=False):
    """The Foreign of a checkpoint dict of kind (detect's answer). for_training: the weights will be trained
    on here, so a model trained with dropout is refused (this trainer has none); for inference it is fine."""
    if kind == "nanogpt":
        foreign = _nanogpt(obj, path, for_training)
    elif kind == "build-nanogpt":
        foreign = _build_nanogpt(obj, path)
    else:
        raise ValueError(f"convert: kind {kind!r} is not one of nanogpt, build-nanogpt")
    _check_tensors(foreign)
    return foreign


def _nanogpt(obj, path, for_training):
    args = obj["model_args"]
    unknown = sorted(set(args) - set(NANOGPT_MODEL_ARGS))
    if unknown:
        raise ConverterError(f"{path}: nanoGPT's model_args has {', '.join(unknown)}, which nanoGPT's GPT does not: "
                             "a modified model.py whose model this trainer cannot vouch for")
    if not args.get("bias", True):
        raise ConverterError(f"{path} is a nanoGPT model with bias=False (no biases in its Linear and LayerNorm "
                             "layers); this trainer's GPT-2 has them everywhere, so it cannot hold this model. Sample "
                             "from it with nanoGPT's sample.py, or train here from a bias=True checkpoint")
    notes = ["GELU: the exact one (nanoGPT's nn.GELU()), as trained, not GPT-2's tanh approximation"]
    dropout = args.get("dropout") or 0.0
    if dropout and for_training:
        raise ConverterError(f"{path} was trained with dropout {dropout} (nanoGPT's model_args), and this trainer has "
                             "no dropout, so training on would change how the model is regularised. Use it for "
                             "inference here (sampling, evaluation, export), or train it on with nanoGPT")
    if dropout:
        notes.append(f"dropout {dropout} of nanoGPT's training is not applied: eval-mode logits never depend on it")
    model_config = _model_config(path, "nanoGPT's model_args", args, gelu="none")
    optimizer, note = _adamw_state(obj.get("optimizer"), model_config)
    notes += [_vocab_note(model_config, "nanoGPT"), note]
    settings = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    return Foreign("nanogpt", path, _our_tensors(obj["model"], path), model_config,
                   steps_done=_number(obj.get("iter_num"), int), best_val_loss=_number(obj.get("best_val_loss"), float),
                   optimizer=optimizer, notes=notes,
                   run_config={k: v for k, v in settings.items() if isinstance(v, PLAIN)})


def _build_nanogpt(obj, path):
    fields = vars(obj["config"]).get("fields", {})  # a PickledConfig: detect() checked it
    unknown = sorted(set(fields) - set(SHAPE_FIELDS))
    if unknown:
        raise ConverterError(f"{path}: build-nanogpt's GPTConfig has {', '.join(unknown)}, which build-nanogpt's does "
                             "not: a modified model whose computation this trainer cannot vouch for")
    model_config = _model_config(path, "build-nanogpt's GPTConfig", fields, gelu="tanh")
    notes = [_vocab_note(model_config, "build-nanogpt"),
             "optimizer: build-nanogpt saves none, so training continues with a fresh AdamW"]
    return Foreign("build-nanogpt", path, _our_tensors(obj["model"], path), model_config,
                   steps_done=_number(obj.get("step"), int), val_loss=_number(obj.get("val_loss"), float), notes=notes)


def _number(value, kind):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _vocab_note(model_config, trainer):
    return (f"vocabulary: {model_config['vocab_size']} rows, none masked: the loss scores every one of them, "
            f"as {trainer} computed it")


def _model_config(path, source, shape, gelu, real_vocab_size=None):
    """The model_config dict of a foreign shape (dict with SHAPE_FIELDS), or a ConverterError saying
    why this trainer cannot hold it."""
    missing = [k for k in SHAPE_FIELDS if k not in shape]
    if missing:
        raise ConverterError(f"{path}: {source} lacks {', '.join(missing)}, so the model's shape is unknown")
    bad = [f"{k} {shape[k]!r}" for k in SHAPE_FIELDS if type(shape[k]) is not int or shape[k] < 1]
    if bad:
        raise ConverterError(f"{path}: {source} has {', '.join(bad)}, not positive whole numbers")
    real_vocab_size = shape["vocab_size"] if real_vocab_size is None else real_vocab_size
    if real_vocab_size < GPT2_TOKENS:
        raise ConverterError(f"{path} has a vocabulary of {real_vocab_size} tokens, fewer than GPT-2's {GPT2_TOKENS}: "
                             "a character-level (or other small-vocabulary) model, whose token ids mean nothing to "
                             "this trainer's GPT-2 tokenizer. Sample from it with the trainer that made it")
    if shape["n_embd"] % shape["n_head"]:
        raise ConverterError(f"{path}: n_embd {shape['n_embd']} is not divisible by n_head {shape['n_head']}, "
                             "which no GPT-2 attention can split into heads")
    try:
        config = config_from_dict({**{k: shape[k] for k in SHAPE_FIELDS}, "real_vocab_size": real_vocab_size,
                                   "gelu": gelu})
    except ModelConfigError as exc:
        raise ConverterError(f"{path}: {exc}") from None
    return asdict(config)


def _our_tensors(state, path):
    """The model's tensors under our names: wrapper prefixes stripped, mask buffers dropped, the tied
    output layer present (GPT-2 shares it with the token embedding, as all three trainers do)."""
    if not isinstance(state, dict):
        raise ConverterError(f"{path}: 'model' holds a {type(state).__name__}, not a state dict")
    tensors = {}
    for key, value in state.items():
        name = WRAPPER_PREFIX.sub("", key)
        if MASK_BUFFER.match(name):
            continue
        if not isinstance(value, torch.Tensor):
            raise ConverterError(f"{path}: model entry {key} is a {type(value).__name__}, not a tensor")
        tensors[name] = value
    for tied, source in TIED_WEIGHTS.items():
        head, embedding = tensors.get(tied), tensors.get(source)
        if head is None and embedding is not None:
            tensors[tied] = embedding
        elif head is not None and embedding is not None and not _same(head, embedding):
            raise ConverterError(f"{path}: {tied} differs from {source}, an output layer not tied to the token "
                                 "embedding; this trainer's GPT-2 ties them, so it cannot hold this model")
    return tensors


def _same(a, b):
    if a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype:
        return True  # one storage saved once: the usual case
    return torch.equal(a, b)  # False for another shape too


def _check_tensors(foreign):
    path, model = foreign.path, model_from_config(foreign.model_config, device="meta")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    unexpected = sorted(set(foreign.tensors) - set(expected))
    if unexpected:
        raise ConverterError(f"{path} has tensors a GPT-2 of its shape lacks: {_some(unexpected)}; a modified model "
                             "this trainer cannot hold")
    missing = sorted(set(expected) - set(foreign.tensors))
    if missing:
        raise ConverterError(f"{path} lacks tensors a GPT-2 of its shape has: {_some(missing)}; a damaged or "
                             "modified checkpoint")
    wrong = [f"{k} is {tuple(t.shape)}, not {expected[k]}" for k, t in foreign.tensors.items()
             if tuple(t.shape) != expected[k]]
    if wrong:
        raise ConverterError(f"{path}: tensors do not match the shape its config states: {_some(wrong)}")


def _some(items, n=3):
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _adamw_state(state, model_config):
    """(nanoGPT's optimizer state dict, one line) where it maps exactly onto GPT.optimizer_groups of this
    model: the same groups holding the same shapes in the same order (nanoGPT groups by dimension over
    named_parameters, as this trainer does). Else (None, why not)."""
    if state is None:
        return None, "optimizer: none in the file, so training continues with a fresh AdamW"
    why = _adamw_mismatch(state, model_from_config(model_config, device="meta").optimizer_groups(0.0))
    if why:
        return None, f"optimizer: nanoGPT's state does not map onto this trainer's AdamW ({why}): a fresh AdamW"
    return state, "optimizer: nanoGPT's AdamW state (moments and step counts) maps onto this trainer's two groups"


def _adamw_mismatch(state, groups):
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        return "not an optimizer state dict"
    saved = state["param_groups"]
    if len(saved) != len(groups):
        return f"{len(saved)} parameter groups, this trainer's AdamW has {len(groups)}"
    for i, (group, ours) in enumerate(zip(saved, groups)):
        if not isinstance(group, dict) or "betas" not in group:
            return f"group {i} has no betas: not AdamW"
        ids = group.get("params") or []
        if len(ids) != len(ours["params"]):
            return f"group {i} holds {len(ids)} tensors, this trainer's {len(ours['params'])}"
        for pid, param in zip(ids, ours["params"]):
            entry = state["state"].get(pid)
            if entry is None:
                continue  # a parameter that never had a gradient: AdamW starts its moments fresh
            if not isinstance(entry, dict) or not {"exp_avg", "exp_avg_sq"} <= set(entry):
                return "state without exp_avg and exp_avg_sq: not AdamW's"
            for name in ("exp_avg", "exp_avg_sq"):
                if tuple(entry[name].shape) != tuple(param.shape):
                    return f"group {i} has {name} of shape {tuple(entry[name].shape)}, this model {tuple(param.shape)}"
    return None


# -----------------------------------------------------------------------------
# llm.c: a header and the raw parameters


def llmc_layout(n_layer, n_embd, block_size, padded_vocab_size):
    """[(our tensor name, shape)] in the order llm.c stores parameters: wte, wpe, then each per-layer
    tensor for all layers before the next (ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b,
    fcw, fcb, fcprojw, fcprojb), then lnfw, lnfb. Weights are (out, in), as nn.Linear stores them."""
    C, L = n_embd, n_layer
    per_layer = [("ln_1.weight", (C,)), ("ln_1.bias", (C,)),
                 ("attn.c_attn.weight", (3 * C, C)), ("attn.c_attn.bias", (3 * C,)),
                 ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                 ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
                 ("mlp.c_fc.weight", (4 * C, C)), ("mlp.c_fc.bias", (4 * C,)),
                 ("mlp.c_proj.weight", (C, 4 * C)), ("mlp.c_proj.bias", (C,))]
    layout = [("transformer.wte.weight", (padded_vocab_size, C)), ("transformer.wpe.weight", (block_size, C))]
    for suffix, shape in per_layer:
        layout += [(f"transformer.h.{i}.{suffix}", shape) for i in range(L)]
    return layout + [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]


def read_llmc(path):
    """The Foreign of an llm.c model file: version 3 (fp32) or 5 (bf16; tensors stay bf16 until a model
    takes them). The tensors are memory-mapped, copy-on-write: pages are read as a model copies them.
    llm.c keeps optimizer state in other files, so there is none here."""
    path = Path(path)
    if not path.is_file():
        raise ConverterError(f"{path} does not exist")
    size = path.stat().st_size
    if size < LLMC_HEADER_BYTES:
        raise ConverterError(f"{path} has {size} bytes, less than llm.c's {LLMC_HEADER_BYTES}-byte header: "
                             "not an llm.c model file, or a truncated copy of one")
    header = [int(x) for x in np.fromfile(path, dtype="<i4", count=256)]
    magic, version, block_size, vocab, n_layer, n_head, n_embd, padded_vocab = header[:8]
    if magic != LLMC_MAGIC:
        what = LLMC_OTHER_MAGICS.get(magic, f"its first number is {magic}, not llm.c's model magic {LLMC_MAGIC}")
        raise ConverterError(f"{path} is not an llm.c model file: {what}. Pass a gpt2_*.bin or model_*.bin")
    if version not in LLMC_DTYPES:
        raise ConverterError(f"{path} is an llm.c model file of version {version}; this reader knows versions 3 (fp32) "
                             "and 5 (bf16), which current llm.c writes: write it again with llm.c's train_gpt2.py")
    dtype = LLMC_DTYPES[version]
    torch_dtype, _, bits = LLMC_NUMBERS[dtype]
    if min(block_size, vocab, n_layer, n_head, n_embd) < 1 or padded_vocab < vocab:
        raise ConverterError(f"{path}: llm.c header gives maxT {block_size}, V {vocab}, L {n_layer}, NH {n_head}, "
                             f"C {n_embd}, Vp {padded_vocab}: not a model shape (a damaged file?)")
    model_config = _model_config(path, "llm.c's header", dict(block_size=block_size, vocab_size=padded_vocab,
                                 n_layer=n_layer, n_head=n_head, n_embd=n_embd), gelu="tanh", real_vocab_size=vocab)
    layout = llmc_layout(n_layer, n_embd, block_size, padded_vocab)
    numel = sum(math.prod(shape) for _, shape in layout)
    expected = LLMC_HEADER_BYTES + numel * np.dtype(bits).itemsize
    if size != expected:
        cause = "truncated (an interrupted write or copy?)" if size < expected else "longer than its header says"
        raise ConverterError(f"{path} has {size} bytes, but its llm.c header (L {n_layer}, C {n_embd}, "
                             f"maxT {block_size}, Vp {padded_vocab}, {dtype}) needs {expected}: {cause}")
    flat = torch.from_numpy(np.memmap(path, dtype=bits, mode="c", offset=LLMC_HEADER_BYTES, shape=(numel,)))
    flat = flat.view(torch_dtype)  # bf16's bits were read as int16
    chunks = flat.split([math.prod(shape) for _, shape in layout])  # views: the pages stay on disk until copied
    tensors = {name: chunk.view(shape) for (name, shape), chunk in zip(layout, chunks)}
    for tied, source in TIED_WEIGHTS.items():  # llm.c ties them: one matrix in the file
        tensors[tied] = tensors[source]
    notes = [f"llm.c model, {dtype}: {vocab} tokens in {padded_vocab} rows, the padding masked as llm.c's "
             "softmax leaves it out",
             "optimizer: llm.c model files hold none, so training continues with a fresh AdamW"]
    return Foreign("llm.c", path, tensors, model_config, notes=notes)


def write_llmc(model_or_state, model_config, path, dtype="fp32"):
    """Write a GPT (or its state dict) of model_config as an llm.c model file, version 3 (fp32) or 5 (bf16),
    through files.atomic_write. llm.c computes GPT-2's tanh GELU, so a model with the exact one is refused."""
    if dtype not in LLMC_NUMBERS:
        raise ValueError(f"write_llmc: dtype {dtype!r} is neither 'fp32' nor 'bf16'")
    path = Path(path)
    try:
        config = model_config if isinstance(model_config, GPTConfig) else config_from_dict(dict(model_config))
    except ModelConfigError as exc:
        raise ConverterError(f"cannot write {path}: {exc}") from None
    if config.gelu != "tanh":
        raise ConverterError(f"cannot write {path}: the model uses the exact GELU (gelu {config.gelu!r}, as nanoGPT "
                             "trains), and llm.c computes GPT-2's tanh approximation, so llm.c would compute "
                             "another function. Keep it as a .pt checkpoint")
    state = unwrap(model_or_state).state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    state = {WRAPPER_PREFIX.sub("", k): v for k, v in state.items()}
    layout = llmc_layout(config.n_layer, config.n_embd, config.block_size, config.vocab_size)
    wrong = [name for name, shape in layout if name not in state or tuple(state[name].shape) != shape]
    if wrong:
        raise ConverterError(f"cannot write {path}: the weights do not fit model config {model_config}: "
                             f"{_some(wrong)} missing or of another shape")
    for tied, source in TIED_WEIGHTS.items():
        if tied in state and not _same(state[tied], state[source]):
            raise ConverterError(f"cannot write {path}: {tied} is not tied to {source}, and llm.c stores one matrix "
                                 "for both")
    version = {v: k for k, v in LLMC_DTYPES.items()}[dtype]
    header = np.zeros(256, dtype="<i4")
    header[:8] = [LLMC_MAGIC, version, config.block_size, config.real_vocab_size, config.n_layer, config.n_head,
                  config.n_embd, config.vocab_size]

    torch_dtype, bits_dtype, bits = LLMC_NUMBERS[dtype]

    def write(f):
        f.write(header.tobytes())
        for name, _ in layout:
            tensor = state[name].detach().to("cpu").contiguous().to(torch_dtype)
            f.write(tensor.view(bits_dtype).numpy().astype(bits, copy=False).tobytes())

    numel = sum(math.prod(shape) for _, shape in layout)
    files.atomic_write(path, write, expected_bytes=LLMC_HEADER_BYTES + numel * np.dtype(bits).itemsize)


# -----------------------------------------------------------------------------
# Any of them


def is_llmc_file(path):
    """True for a file of llm.c's (model, state, tokenizer or token shard), False for torch.save's zip or pickle."""
    with open(path, "rb") as f:
        start = f.read(4)
    if start == b"PK\x03\x04" or start[:1] == b"\x80":  # torch.save's zip, or an older raw pickle
        return False
    first_int = int.from_bytes(start, "little") if len(start) == 4 else None
    return Path(path).suffix == ".bin" or first_int == LLMC_MAGIC or first_int in LLMC_OTHER_MAGICS


def is_llmc_model(path):
    """True for an llm.c model file: its first int32 is llm.c's model magic (its optimizer state files,
    tokenizer and token shards, also .bin, have other numbers there)."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(4), "little") == LLMC_MAGIC
