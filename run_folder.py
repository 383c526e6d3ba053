"""A run folder holds one run. Which checkpoint continues it, and what a resume moves aside, so that a
command never overwrites or deletes a file it did not write in this run's timeline, and never starts
over in a folder that holds a run.

    check_run_folder(log_dir, resuming, start_over)      before anything is written: a folder, free, not a run
                                                         that the command would start over
    resume = find_resume(log_dir, auto, path, reset_optimizer)   rank 0: the chosen file read and verified once;
                                                         None only where the folder holds no checkpoint at all
    make_room(log_dir, resume, start_over)               rank 0, once every check has passed: the run --start_over
                                                         replaces, or the newer files a resume leaves, moved aside
    check_other_machines(log_dir, resume)                every rank: no machine holds a newer run than rank 0's
    record_divergence(log_dir, step, healthy)            a NaN stop: the next --auto_resume rewinds to `healthy`

The rules (docs/FAILURES.md shows each message):
- --auto_resume takes latest_checkpoint.pt (a pointer followed only to a file inside the folder), else the
  highest step. It skips a damaged file (its CRC, a torn or unreadable zip) for an older healthy one, saying
  which; anything else it cannot resume (another trainer's file, a newer format, a file that would run code,
  an export) stops it with one line naming the file and the fix. It starts fresh only in a folder without
  any checkpoint-like file.
- Resuming from a checkpoint older than the newest in the folder moves the newer files into
  <log_dir>/rewound_<time>/ (one line): the run continues from there, and nothing newer is overwritten.
- After a divergence (a NaN or inf loss) the folder records the newest healthy checkpoint; the next
  --auto_resume resumes from it and moves the exploded ones into <log_dir>/diverged_<time>/.
"""
import json
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import converters
import distributed
import files
from checkpoint import (BEST_NAME, CHECKPOINT_PATTERN, LATEST_NAME, CheckpointError, DamagedCheckpoint,
                        check_zip_crc, list_checkpoints, load_checkpoint, model_keys_of, not_resumable, point_latest,
                        read_latest, verify_checkpoint)
from cli import log

DIVERGED_NAME = "diverged.json"  # written by a NaN stop: the step, and the healthy checkpoint to go back to
OTHER_TRAINERS = ("ckpt.pt",)  # nanoGPT's one checkpoint; build-nanogpt's are model_*.pt, llm.c's *.bin
RUN_FILES = (LATEST_NAME, BEST_NAME, DIVERGED_NAME, "metrics.jsonl", "tensorboard", "wandb",
             "failures")  # what --start_over moves (failures/: watchdog.py's logs)


@dataclass
class Resume:
    """The checkpoint a run continues from: its path and step, its stored settings (run_config with its
    model_config) and, on rank 0, the whole verified dict."""
    path: str
    step: int
    run_config: dict
    ckpt: dict = None
    moves: tuple = ()  # (file names, folder prefix, why): what make_room moves aside before training starts

    def shared(self):
        """What the other ranks get: everything but the tensors (they receive their part of those later)."""
        return replace(self, ckpt=None)


def checkpoint_like_files(log_dir):
    """Every file in log_dir that holds a run: this trainer's (model_*.pt, best_model.pt), nanoGPT's ckpt.pt,
    llm.c's model files; oldest first by name."""
    log_dir = Path(log_dir)
    found = [p for _, p in list_checkpoints(log_dir)]
    found += [log_dir / name for name in (BEST_NAME,) + OTHER_TRAINERS if (log_dir / name).is_file()]
    found += [p for p in sorted(log_dir.glob("*.bin")) if p.is_file() and converters.is_llmc_model(p)]
    return found


def check_run_folder(log_dir, resuming=False, start_over=False):
    """The --log_dir can be this run's: a folder (or nothing yet), no other trainer holds it, and a run in it
    is resumed or explicitly started over, never silently overwritten."""
    log_dir = Path(log_dir)
    if log_dir.exists() and not log_dir.is_dir():
        raise CheckpointError(f"--log_dir {log_dir} is a file, not a folder; name a folder (it is created if needed)")
    files.RunLock.check(log_dir)
    existing = checkpoint_like_files(log_dir)
    if existing and not (resuming or start_over):
        newest = read_latest(log_dir) or max(existing, key=lambda p: p.stat().st_mtime)
        raise CheckpointError(f"{log_dir} already holds a run (newest: {Path(newest).name}); continue it with "
                              "--auto_resume, start a new one in another --log_dir, or pass --start_over to move it "
                              "aside and train from step 0 here")


def move_aside(log_dir, names, prefix):
    """Move these files of log_dir into a new folder log_dir/<prefix>_<time>, deleting nothing; returns it."""
    log_dir = Path(log_dir)
    aside = log_dir / time.strftime(f"{prefix}_%Y%m%d-%H%M%S")
    while aside.exists():
        aside = aside.with_name(aside.name + "_")
    aside.mkdir()
    for name in names:
        if (log_dir / name).exists() or (log_dir / name).is_symlink():
            os.replace(log_dir / name, aside / name)
    files.fsync_dir(log_dir)
    return aside


def record_divergence(log_dir, step, healthy):
    """A NaN / inf stop at step: the next --auto_resume goes back to `healthy` (a checkpoint path)."""
    files.atomic_write(Path(log_dir) / DIVERGED_NAME,
                       lambda f: f.write(json.dumps({"step": step, "healthy": Path(healthy).name}).encode()))


def _verified(path):
    """The checkpoint dict of a file this trainer can resume from, verified against its own model config; a
    DamagedCheckpoint for a damaged file, a CheckpointError naming the fix for any other."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if converters.is_llmc_file(path):
        raise not_resumable(path, "llm.c")
    check_zip_crc(path)
    ckpt = load_checkpoint(path)
    verify_checkpoint(ckpt, path)
    verify_checkpoint(ckpt, path, model_keys=model_keys_of(ckpt, path))
    return ckpt


def _resume(path, ckpt, moves):
    run_config = {**(ckpt.get("run_config") or {}), "model_config": ckpt["model_config"]}
    return Resume(str(path), ckpt["train_state"]["step"], run_config, ckpt, moves)


def _step_of(path):
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def _rewind(log_dir, chosen, prefix, why):
    """The move that leaves chosen (a path inside log_dir) the newest: every newer step checkpoint (and a
    divergence record) aside. Planned here, done by make_room once the command is known to run."""
    log_dir, step = Path(log_dir), _step_of(chosen)
    newer = [p.name for s, p in list_checkpoints(log_dir) if step is not None and s > step]
    extra = [DIVERGED_NAME] if (log_dir / DIVERGED_NAME).exists() else []
    return ((tuple(newer + extra), prefix, why),) if newer or extra else ()


def make_room(log_dir, resume, start_over=False):
    """Rank 0, after every check, deleting nothing: --start_over moves the run in log_dir (its checkpoints, latest,
    metrics, TensorBoard, W&B) into log_dir/replaced_<time>/; a resume moves aside what it leaves behind and
    points latest at its file."""
    if start_over and checkpoint_like_files(log_dir):
        aside = move_aside(log_dir, [p.name for p in checkpoint_like_files(log_dir)] + list(RUN_FILES), "replaced")
        log(f"--start_over: the run that was in {log_dir} is now in {aside}")
    if resume is None:
        return
    for names, prefix, why in resume.moves:
        aside = move_aside(log_dir, names, prefix)
        shown = [name for name in names if name != DIVERGED_NAME]
        log(f"resume: {why}: {', '.join(shown) or 'its record'} moved into {aside}, nothing deleted")
    path = Path(resume.path)
    if path.resolve().parent == Path(log_dir).resolve() and _step_of(path) is not None \
            and read_latest(log_dir) != path.resolve():
        point_latest(log_dir, path)


def find_resume(log_dir, auto=False, path=None, reset_optimizer=False):
    """The Resume this command continues from (rank 0), or None where it starts at step 0: no --auto_resume
    and no path, or a folder without any checkpoint-like file. Raises CheckpointError naming the file and the
    fix where the folder's run cannot be continued."""
    log_dir = Path(log_dir)
    if path is not None:
        return _resume_from(log_dir, Path(path), reset_optimizer)
    if not auto:
        return None
    existing = checkpoint_like_files(log_dir)
    if not existing:
        log(f"no checkpoint in {log_dir}: starting fresh")
        return None
    diverged = _read_divergence(log_dir)
    if diverged is not None:
        ckpt = _verified(diverged)  # the healthy checkpoint the stop named: it must be whole
        _check_optimizer(ckpt, diverged, reset_optimizer)
        log(f"auto-resume: {diverged}, the newest healthy checkpoint before the run diverged")
        return _resume(diverged, ckpt, _rewind(log_dir, diverged, "diverged",
                                               f"the run diverged after {diverged.name}"))
    latest = read_latest(log_dir)  # first: after a resume from an older file, latest is the live timeline
    candidates = [latest] if latest is not None else []
    candidates += [p.resolve() for _, p in reversed(list_checkpoints(log_dir)) if p.resolve() not in candidates]
    skipped, weights_only = [], None
    for candidate in candidates:
        try:
            ckpt = _verified(candidate)
        except DamagedCheckpoint as exc:
            skipped.append(f"{candidate.name} ({exc})")
            log(f"auto-resume: skipping {candidate.name}, which is damaged: {exc}")
            continue
        if not reset_optimizer and ckpt.get("optimizer") is None:  # an older file of --save_optimizer latest
            weights_only = weights_only or candidate
            continue
        log(f"auto-resume: {candidate}")
        newest = f"{candidate.name} is the newest whole checkpoint" + (" with an optimizer" if weights_only else "")
        moves = _rewind(log_dir, candidate, "rewound", newest) if weights_only is not None or skipped else ()
        return _resume(candidate, ckpt, moves)
    if weights_only is not None:
        raise CheckpointError(f"{weights_only} is the newest whole checkpoint in {log_dir}, and it holds weights only "
                              f"({'the newer ones are damaged: ' + '; '.join(skipped) if skipped else 'no file has an optimizer'}); "
                              f"continue its weights with a fresh optimizer: --resume_from_checkpoint {weights_only} "
                              "--reset_optimizer")
    what = "; ".join(skipped) if skipped else ", ".join(p.name for p in existing)
    raise CheckpointError(f"{log_dir} holds no checkpoint this trainer can resume ({what}), so --auto_resume stops "
                          f"rather than train over it. Start a new run in another --log_dir (--init_from FILE takes "
                          f"another trainer's weights), or --start_over to move these files aside")


def _resume_from(log_dir, path, reset_optimizer):
    """--resume_from_checkpoint PATH: exactly this file (a bad one is an error, not a fallback); a folder: its newest."""
    if path.is_dir():  # its newest, as --auto_resume would take it
        found = find_resume(path, auto=True, reset_optimizer=reset_optimizer)
        if found is None:
            raise CheckpointError(f"--resume_from_checkpoint {path}: that folder holds no checkpoint")
        if path.resolve() == log_dir.resolve():
            return found
        _refuse_another_run(log_dir, found.path)
        return replace(found, moves=())  # another folder's files are not this command's to move
    try:
        ckpt = _verified(path)
    except CheckpointError as exc:
        existing = ", ".join(p.name for p in checkpoint_like_files(log_dir)) or "none"
        raise CheckpointError(f"cannot resume from {path}: {exc}. Checkpoints in {log_dir}: {existing}") from None
    _check_optimizer(ckpt, path, reset_optimizer)
    inside = path.resolve().parent == log_dir.resolve()
    if not inside:
        _refuse_another_run(log_dir, path)
    moves = _rewind(log_dir, path, "rewound", f"resuming from {path.name}, older than the newest") if inside else ()
    log(f"resume: {path}")
    return _resume(path, ckpt, moves)


def _refuse_another_run(log_dir, path):
    if checkpoint_like_files(log_dir):
        raise CheckpointError(f"{log_dir} holds another run; resume {path} into the folder it came from, an empty "
                              "--log_dir, or pass --start_over to move that run aside first")


def _check_optimizer(ckpt, path, reset_optimizer):
    if not reset_optimizer and ckpt.get("optimizer") is None:
        raise CheckpointError(f"{path} holds weights only (an older file of --save_optimizer latest, or "
                              f"{BEST_NAME}); resume from the newest checkpoint, or pass --reset_optimizer "
                              "to continue its weights with a fresh optimizer")


def _read_divergence(log_dir):
    """The healthy checkpoint a NaN stop recorded, where the folder has one and it is still there."""
    record = Path(log_dir) / DIVERGED_NAME
    try:
        healthy = Path(log_dir) / json.loads(record.read_text())["healthy"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return healthy if healthy.is_file() and healthy.parent == Path(log_dir) else None


def check_other_machines(log_dir, resume_path):
    """Every rank calls it. Without a shared disk only the machine that ran rank 0 holds the checkpoints; if
    rank 0 now runs on a machine without them, starting fresh would silently start the run over."""
    newest = max((step for step, _ in list_checkpoints(log_dir)), default=-1)
    seen = distributed.all_values((socket.gethostname(), os.path.realpath(log_dir), newest))
    host0, folder0, step0 = seen[0]
    newer = [(rank, host, step) for rank, (host, folder, step) in enumerate(seen)
             if (host, folder) != (host0, folder0) and step > step0]  # another machine's own folder
    if not newer:
        return
    rank, host, step = max(newer, key=lambda item: item[2])
    where = f"model_{step:05d}.pt in {log_dir} on {host} (rank {rank})"
    if resume_path is None:
        raise CheckpointError(f"rank 0 runs on {host0}, which has no checkpoint in {log_dir}, but {where}: run "
                              f"the job with that machine as node rank 0, or copy its {log_dir} to {host0}")
    log(f"auto-resume: {where} is newer than rank 0's {Path(resume_path).name}; resuming rank 0's (make that "
        "machine node rank 0 to continue from its files)")
