"""OpenAI's GPT-2 weights in and out, through Hugging Face transformers (optional: pip install transformers).

Public API:
    PRETRAINED                                   names transformers downloads: gpt2, gpt2-medium, gpt2-large, gpt2-xl
    gpt_config(name_or_path, block_size=None) -> GPTConfig   the weights' shape (reads config.json only)
    from_pretrained(name_or_path, config=None) -> GPT        a name above, or a save_pretrained folder
    from_hf(hf_model, config=None) -> GPT                    an in-memory GPT2LMHeadModel converted
    to_hf(model) -> GPT2LMHeadModel                          the other way
    export(checkpoint_path, out_dir)                         a checkpoint as a GPT2LMHeadModel folder
    HFError                                                  the message names the fix

    python train_gpt2.py --init_from gpt2 ...                # fine-tune OpenAI's 124M model
    python gpt2_hf.py export log/model_19072.pt --out gpt2-mine   # then GPT2LMHeadModel.from_pretrained("gpt2-mine")

The parameter names are the same on both sides (transformer.h.0.attn.c_attn.weight, ...). Two things
differ. transformers' GPT-2 uses Conv1D layers, which store a weight as (in, out), the transpose of
nn.Linear's (out, in). And this trainer pads the vocabulary from 50257 to 50304 rows for faster
matmuls: imported models get zero rows there, exports drop them, and GPT.forward gives the padding
no probability, so losses, samples and HellaSwag scores are those of the original model.
"""
import sys
from pathlib import Path

import environment  # noqa: F401  before torch: it sets variables torch reads when it loads
import torch

import checkpoint
import cli
from model import GPT, TIED_WEIGHTS, GPTConfig

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# transformers' activation names -> GPTConfig.gelu
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# Weights transformers keeps in Conv1D layers: transposed relative to our nn.Linear.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class HFError(cli.UserError):
    """transformers is missing, or the weights cannot be had or do not fit; the message names the fix."""


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise HFError("GPT-2 weights from or to Hugging Face need the transformers package, which is not "
                      "installed: pip install transformers") from None
    return transformers


def _from_pretrained(class_name, what, name_or_path):
    """transformers.<class_name>.from_pretrained(name_or_path), or an HFError naming the fix."""
    if name_or_path not in PRETRAINED and not Path(name_or_path).is_dir():
        raise HFError(f"--init_from {name_or_path!r} is neither one of {', '.join(PRETRAINED)} nor a folder "
                      "written by save_pretrained (config.json + model.safetensors) nor a checkpoint file (this "
                      "trainer's, nanoGPT's ckpt.pt, build-nanogpt's model_*.pt, llm.c's .bin)")
    transformers = import_transformers()
    try:
        return getattr(transformers, class_name).from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise HFError(f"cannot load the {what} of {name_or_path!r} ({str(exc).splitlines()[0]}). Offline? Run "
                      f"GPT2LMHeadModel.from_pretrained({name_or_path!r}).save_pretrained(DIR) where the hub is "
                      "reachable and pass --init_from DIR") from None


def _check_architecture(hf_config, source):
    """GPT2Config options that would make the weights compute something our GPT does not."""
    problems = []
    if getattr(hf_config, "model_type", "gpt2") != "gpt2":
        problems.append(f"model_type is {hf_config.model_type!r}, not 'gpt2'")
    if hf_config.activation_function not in GELU:
        problems.append(f"activation_function is {hf_config.activation_function!r} (ours: GELU, exact or tanh approximation)")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        problems.append(f"n_inner is {hf_config.n_inner} (ours: 4 * n_embd)")
    if abs(hf_config.layer_norm_epsilon - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon is {hf_config.layer_norm_epsilon} (ours: 1e-5)")
    if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
        problems.append("attention scaling is not GPT-2's 1/sqrt(head size)")
    if not getattr(hf_config, "tie_word_embeddings", True):
        problems.append("the output layer is not tied to the token embedding")
    if hf_config.n_embd % hf_config.n_head:
        problems.append(f"n_embd {hf_config.n_embd} is not divisible by n_head {hf_config.n_head}")
    if problems:
        raise HFError(f"{source} is not a GPT-2 this trainer can hold: {'; '.join(problems)}")


def _gpt_config_from_hf(hf_config, source, block_size=None):
    _check_architecture(hf_config, source)
    padded_vocab = GPTConfig.vocab_size
    if hf_config.vocab_size > padded_vocab:
        raise HFError(f"{source} has {hf_config.vocab_size} tokens, more than this trainer's {padded_vocab}")
    return GPTConfig(block_size=min(block_size or hf_config.n_positions, hf_config.n_positions),
                     vocab_size=padded_vocab, n_layer=hf_config.n_layer, n_head=hf_config.n_head,
                     n_embd=hf_config.n_embd, real_vocab_size=hf_config.vocab_size,
                     gelu=GELU[hf_config.activation_function])


def gpt_config(name_or_path, block_size=None):
    """The GPTConfig that holds these weights: their shape, the padded vocabulary, and a position table
    of block_size (at most the weights' n_positions; shorter keeps the first rows)."""
    return _gpt_config_from_hf(_from_pretrained("GPT2Config", "config", name_or_path), name_or_path, block_size)


def from_hf(hf_model, config=None):
    """Our GPT with the weights of a transformers GPT2LMHeadModel (fp32, CPU)."""
    source = getattr(hf_model, "name_or_path", None) or "the GPT2LMHeadModel"
    model = GPT(config or _gpt_config_from_hf(hf_model.config, source))
    _copy_weights(hf_model.state_dict(), model.state_dict(), source)
    return model


def from_pretrained(name_or_path, config=None):
    """Our GPT holding OpenAI's weights (downloaded and cached by transformers) or those of a
    save_pretrained folder. config: from gpt_config(), to choose a shorter block size."""
    return from_hf(_from_pretrained("GPT2LMHeadModel", "weights", name_or_path), config)


def to_hf(model):
    """A transformers GPT2LMHeadModel (eval mode) with the weights of our GPT, without the vocabulary padding."""
    transformers = import_transformers()
    cfg = model.config
    hf_config = transformers.GPT2Config(vocab_size=cfg.real_vocab_size, n_positions=cfg.block_size,
                                        n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                        activation_function="gelu_new" if cfg.gelu == "tanh" else "gelu",
                                        tie_word_embeddings=True)
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    _copy_weights(model.state_dict(), hf_model.state_dict(), "the GPT")
    return hf_model.eval()


def _copy_weights(source_state, target_state, source):
    """Copy a GPT-2 state dict into another of the same names (target_state's tensors are views of the parameters),
    transposing transformers' Conv1D weights. Ours pads the vocabulary, and may have a shorter position table."""
    with torch.no_grad():
        for name, target in target_state.items():
            if name in TIED_WEIGHTS:
                continue  # the same tensor as the weight it is tied to
            if name not in source_state:
                raise HFError(f"{source} has no tensor {name}; is it a GPT-2 checkpoint?")
            weight = source_state[name].float()
            if name.endswith(CONV1D):
                weight = weight.t()
            if name in ("transformer.wte.weight", "transformer.wpe.weight"):
                weight = weight[:len(target)]  # the first rows: no padding rows, or a shorter position table
            if name == "transformer.wte.weight":
                target.zero_()  # padding rows: never real tokens
                target = target[:len(weight)]
            target.copy_(weight)


def export(checkpoint_path, out_dir):
    """Write any checkpoint file (checkpoint.load_model's: this trainer's, nanoGPT's, build-nanogpt's, llm.c's)
    as a GPT2LMHeadModel folder (config.json, model.safetensors)."""
    import_transformers()  # before reading a large checkpoint
    model, _ = checkpoint.load_model(checkpoint_path, "cpu")
    to_hf(model).save_pretrained(out_dir)


def run(argv=None):
    p = cli.ArgumentParser(description="Convert checkpoints (this trainer's, nanoGPT's, build-nanogpt's, llm.c's) to "
                                       "Hugging Face transformers' GPT-2.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("export", help="a checkpoint as a GPT2LMHeadModel folder (save_pretrained)")
    s.add_argument("checkpoint", help=checkpoint.ANY_FILE)
    s.add_argument("--out", required=True, help="folder to write config.json and model.safetensors to")
    args = p.parse_args(argv)
    export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} to {args.out}: GPT2LMHeadModel.from_pretrained({args.out!r}); "
          "the tokenizer is GPT-2's: AutoTokenizer.from_pretrained('gpt2') or tiktoken's r50k_base")
    return 0


def main(argv=None):
    with cli.log_to(sys.stderr):  # stdout is the result
        return cli.main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
