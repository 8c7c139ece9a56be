"""The course's one-minute model against nanoGPT's CPU recipe: same corpus, same exact score.

    python benchmarks/vs_nanogpt.py /path/to/nanoGPT                   # the full comparison
    python benchmarks/vs_nanogpt.py /path/to/nanoGPT --recipe 3min --threads 2 --json out.json
    python benchmarks/vs_nanogpt.py /path/to/nanoGPT --nanogpt-iters 20 --ours-steps 30   # smoke test

nanoGPT (https://github.com/karpathy/nanoGPT, checked against commit 3adf61e) is not part of the
course and none of its code is copied here: this script only *runs* the checkout's own
``train.py`` in a subprocess and imports its ``model.py`` to score the checkpoint it saved.

What it does:

1. Writes the course's corpus (``lessons_lib.pretrained.shakespeare_data()``: the character
   tokenizer, the last 10% of the ids as validation) in nanoGPT's ``shakespeare_char`` format
   (``train.bin`` / ``val.bin`` as uint16 ids, ``meta.pkl`` with vocab_size, itos, stoi) into a
   temporary working directory, next to symlinks to the checkout's ``train.py``, ``model.py``,
   ``configurator.py`` and ``config/`` (train.py reads ``data/<dataset>/`` and execs
   ``configurator.py`` relative to its working directory). The checkout is left untouched
   (bytecode caching is off in the subprocess).
2. Runs nanoGPT's README CPU recipe there in a fresh process (config/train_shakespeare_char.py with
   ``--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
   --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``, plus
   our dataset, an out_dir in the temporary folder and ``--always_save_checkpoint=True`` so that
   the final model is saved). It trains in float32 (nanoGPT uses no autocast on a CPU).
3. Runs the course's recipe (``RECIPES["1min"]`` by default) through
   ``lessons_lib.pretrained.train_shakespeare_char`` in a fresh process too (this script again,
   with a hidden flag).
4. Scores nanoGPT's final checkpoint with ``lessons_lib.pretrained.evaluate_split`` (every
   validation token predicted exactly once, windows of 64) on the same validation ids the course
   model is scored on; the course's own report already holds that number.

Measured, for each side: the wall time of the whole process (``time.perf_counter`` around
``subprocess.run``: interpreter start, imports, data loading, training, periodic evaluations,
saving), the last logged validation estimate (nanoGPT: 20 random batches; ours: the recipe's
fixed batches) and the exact validation loss. The course's process also computes its exact score
(one pass over the validation split) inside the timed run, which counts against it; nanoGPT's
checkpoint is scored afterwards, untimed. nanoGPT's loop also evaluates at step 0 and takes one
training step after its last evaluation: that is its recipe, timed as it is.

The goal is: ours exact <= nanoGPT exact, and ours wall / nanoGPT wall <= 0.5. Both processes get
the same thread setting (``--threads`` sets OMP_NUM_THREADS for both, and torch.set_num_threads in
ours); the machine should be otherwise quiet. ``--nanogpt-iters`` and ``--ours-steps`` shorten the
runs for a smoke test; the numbers are then meaningless. This is a script for maintainers, not
part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import importlib.util
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

NANOGPT_COMMIT = "3adf61e"                      # the commit the README recipe was checked against
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")
NANOGPT_CONFIG_EVAL_INTERVAL = 250              # eval_interval in config/train_shakespeare_char.py
DATASET = "lessons_shakespeare_char"            # our folder under data/, not nanoGPT's own
BLOCK_SIZE = 64                                 # the README recipe's context
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
GOAL_RATIO = 0.5


def nanogpt_args(iters: int, out_dir: Path) -> list[str]:
    """The README's CPU command line, on our dataset, saving the final model into ``out_dir``."""
    args = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
            "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
            "--n_embd=128", f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0",
            f"--dataset={DATASET}", f"--out_dir={out_dir}", "--always_save_checkpoint=True"]
    if iters % NANOGPT_CONFIG_EVAL_INTERVAL:      # a short test run: still evaluate (and save) at the end
        args.append(f"--eval_interval={iters}")
    return args


# -----------------------------------------------------------------------------
# the machine

def cpu_info() -> dict:
    """The CPU's model name and the vector / matrix flags that decide bf16 speed, from /proc/cpuinfo."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    return {"model": name, "flags": {f: f in flags for f in CPU_FLAGS}, "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_cpu_capability": capability,
            "torch_threads": torch.get_num_threads()}


def git_commit(path: Path) -> dict:
    """The checkout's HEAD (``git -C``, so a worktree works too) and whether it has local changes."""
    def git(*args):
        done = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    except OSError:                                # no git on this machine
        commit, status = None, None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# -----------------------------------------------------------------------------
# nanoGPT's side

def check_checkout(path: Path) -> Path:
    path = path.expanduser().resolve()
    missing = [f for f in NANOGPT_FILES if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"error: {path} does not look like a nanoGPT checkout "
                         f"(https://github.com/karpathy/nanoGPT): expected {', '.join(NANOGPT_FILES)} "
                         f"in it, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    return path


def prepare_workdir(checkout: Path, workdir: Path, tokenizer, train_ids, val_ids) -> None:
    """Symlinks to nanoGPT's files and our corpus in its format under ``data/<DATASET>/``."""
    for name in ("train.py", "model.py", "configurator.py", "config"):
        (workdir / name).symlink_to(checkout / name)
    data = workdir / "data" / DATASET
    data.mkdir(parents=True)
    if tokenizer.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"a vocabulary of {tokenizer.vocab_size} does not fit nanoGPT's uint16 ids")
    for split, ids in (("train", train_ids), ("val", val_ids)):
        ids.numpy().astype(np.uint16).tofile(data / f"{split}.bin")
    meta = {"vocab_size": tokenizer.vocab_size, "itos": dict(tokenizer.itos), "stoi": dict(tokenizer.stoi)}
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    written = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).astype(np.int64))
    if not torch.equal(written, val_ids):
        raise RuntimeError("val.bin does not read back as the validation ids")


def child_env(threads: int | None) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")     # no __pycache__ inside the checkout
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_timed(cmd: list[str], what: str, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd``, capturing its output; return it and its wall time. A failure shows stderr's tail."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-30:])
        raise SystemExit(f"error: {what} failed (exit status {done.returncode}) after {seconds:.1f} s; "
                         f"the end of its output:\n{tail}\n(command: {' '.join(cmd)})")
    return done, seconds


def run_nanogpt(workdir: Path, iters: int, threads: int | None) -> dict:
    out_dir = workdir / "out"
    cmd = [sys.executable, "train.py", *nanogpt_args(iters, out_dir)]
    print(f"running nanoGPT ({iters} iterations) in {workdir} ...", flush=True)
    done, seconds = run_timed(cmd, "nanoGPT's train.py", cwd=workdir, env=child_env(threads))
    evals = re.findall(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", done.stdout, re.MULTILINE)
    if not evals:
        raise SystemExit("error: nanoGPT's output holds no 'step N: train loss ..., val loss ...' line; "
                         f"its last lines:\n{done.stdout[-2000:]}")
    step, train_loss, val_loss = evals[-1]
    checkpoint = out_dir / "ckpt.pt"
    if not checkpoint.is_file():
        raise SystemExit(f"error: nanoGPT saved no checkpoint at {checkpoint}")
    print(f"  done in {seconds:.1f} s: step {step}, logged val loss {val_loss}", flush=True)
    return {"iters": iters, "command": " ".join(["python", "train.py", *nanogpt_args(iters, Path("OUT"))]),
            "process_seconds": seconds, "logged_step": int(step), "logged_train_loss": float(train_loss),
            "logged_val_loss": float(val_loss), "precision": "fp32 (no autocast on a CPU)",
            "checkpoint": str(checkpoint)}


class AllPositions(torch.nn.Module):
    """nanoGPT's GPT, called so that it returns the logits of every position.

    Without targets its forward computes only the last position's logits; with (dummy) targets
    it computes them all. ``wrapper(x)`` returns ``(logits, None)`` as ``evaluate_split`` expects.
    """

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.config = gpt.config

    def forward(self, idx):
        logits, _ = self.gpt(idx, torch.zeros_like(idx))
        return logits, None


def load_nanogpt(workdir: Path, checkpoint: Path, trust: bool = False):
    """nanoGPT's model class (imported from the checkout's model.py) with the checkpoint's weights."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=not trust)
    except Exception as err:                     # an UnpicklingError, or whatever a new torch raises
        raise SystemExit(
            f"error: torch.load(..., weights_only=True) refused {checkpoint}:\n  {err}\n"
            "weights_only=True unpickles only tensors and plain containers; this checkpoint holds some "
            "other Python object (nanoGPT 3adf61e saves tensors, dicts, numbers and strings, so a newer "
            "nanoGPT or torch may be the cause). The script does not fall back on its own: rerun with "
            "--trust-checkpoint to load it with weights_only=False, which runs arbitrary pickled code, "
            "so only for a checkpoint you produced yourself.") from err
    spec = importlib.util.spec_from_file_location("nanogpt_model", workdir / "model.py")
    module = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    prefix = "_orig_mod."                        # what torch.compile adds to the keys
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in ckpt["model"].items()}
    with contextlib.redirect_stdout(io.StringIO()):          # its constructor prints the parameter count
        gpt = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(state)
    return AllPositions(gpt).eval(), ckpt


def score_nanogpt(result: dict, workdir: Path, val_ids: torch.Tensor, vocab_size: int, trust: bool) -> None:
    from lessons_lib.pretrained import evaluate_split

    model, ckpt = load_nanogpt(workdir, Path(result["checkpoint"]), trust)
    if model.config.vocab_size != vocab_size:
        raise SystemExit(f"error: nanoGPT's model has vocab_size {model.config.vocab_size}, "
                         f"the corpus {vocab_size}")
    result["checkpoint_iter"] = int(ckpt["iter_num"])
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["exact_val_loss"] = evaluate_split(model, val_ids, block_size=BLOCK_SIZE)
    print(f"  exact val loss of its checkpoint (iteration {result['checkpoint_iter']}): "
          f"{result['exact_val_loss']:.4f}", flush=True)


# -----------------------------------------------------------------------------
# the course's side

def course_recipe(name: str, steps: int | None):
    """The named recipe, or a shortened copy of it (``steps`` steps, warmup scaled, one evaluation)."""
    from lessons_lib.pretrained import RECIPES

    if name not in RECIPES:
        raise SystemExit(f"error: unknown recipe {name!r}; the named recipes are {list(RECIPES)}")
    recipe = RECIPES[name]
    if steps:
        warmup = round(steps * recipe.train.warmup_steps / recipe.train.max_steps)
        train = dataclasses.replace(recipe.train, max_steps=steps, warmup_steps=warmup,
                                    eval_interval=steps)
        recipe = dataclasses.replace(recipe, train=train)
    return recipe


def train_ours(name: str, steps: int | None, threads: int | None, result_path: Path) -> None:
    """The child process: train the course's recipe and write what it reports as JSON."""
    from lessons_lib.pretrained import train_shakespeare_char

    if threads:
        torch.set_num_threads(threads)
    _, _, report = train_shakespeare_char(course_recipe(name, steps), progress=False)
    precision = report.precision
    history = report.history
    result = {"recipe_name": name + (f" shortened to {steps} steps" if steps else ""),
              "recipe": report.recipe, "precision": precision, "device": report.device,
              "torch_threads": torch.get_num_threads(), "train_seconds": report.train_seconds,
              "steps": report.steps, "tokens": report.tokens, "parameters": report.parameters,
              "logged_step": history["eval_step"][-1] if history.get("eval_step") else None,
              "logged_val_loss": history["val_loss"][-1] if history.get("val_loss") else None,
              "exact_val_loss": report.val_loss}
    result_path.write_text(json.dumps(result))


def run_ours(name: str, steps: int | None, threads: int | None, workdir: Path) -> dict:
    result_path = workdir / "ours.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_run-ours", str(result_path), "--recipe", name]
    if steps:
        cmd += ["--ours-steps", str(steps)]
    if threads:
        cmd += ["--threads", str(threads)]
    print(f"running the course's recipe {name!r}{f' ({steps} steps)' if steps else ''} ...", flush=True)
    _, seconds = run_timed(cmd, "the course's training", env=child_env(threads))
    result = json.loads(result_path.read_text())
    result["process_seconds"] = seconds
    print(f"  done in {seconds:.1f} s: logged val loss {result['logged_val_loss']:.4f}, "
          f"exact {result['exact_val_loss']:.4f}", flush=True)
    return result


# -----------------------------------------------------------------------------
# the report

def verdict(ours: dict, nano: dict | None) -> dict:
    if not nano or nano.get("exact_val_loss") is None:
        return {"ratio": None, "loss_ok": None, "time_ok": None, "goal_met": None}
    ratio = ours["process_seconds"] / nano["process_seconds"]
    loss_ok = ours["exact_val_loss"] <= nano["exact_val_loss"]
    time_ok = ratio <= GOAL_RATIO
    return {"ratio": ratio, "loss_ok": loss_ok, "time_ok": time_ok, "goal_met": loss_ok and time_ok}


def print_report(result: dict) -> None:
    machine, nano, ours, goal = result["machine"], result["nanogpt"], result["ours"], result["verdict"]
    flags = " ".join(f"{f}={'yes' if on else 'no'}" for f, on in machine["flags"].items())
    print("\n" + "=" * 100)
    print(f"CPU              : {machine['model']} ({machine['cores']} logical cores)")
    print(f"CPU flags        : {flags}")
    print(f"torch            : {machine['torch']}, CPU capability {machine['torch_cpu_capability']}, "
          f"{result['threads_setting']}")
    commit = result["nanogpt_checkout"]
    if result["nanogpt_path"] is None:
        print("nanoGPT          : no checkout given")
    else:
        head = commit["commit"] or "unknown (not a git checkout)"
        note = "" if not commit["commit"] or commit["commit"].startswith(NANOGPT_COMMIT) else \
            f"  (the recipe was checked against {NANOGPT_COMMIT})"
        print(f"nanoGPT          : {result['nanogpt_path']} at {head}"
              f"{' with local changes' if commit['dirty'] else ''}{note}")
    if nano:
        print(f"nanoGPT run      : {nano['iters']} iterations, {nano['parameters']:,} parameters, "
              f"{nano['precision']}")
        print(f"  process wall   : {nano['process_seconds']:8.1f} s")
        print(f"  logged val     : {nano['logged_val_loss']:8.4f}   "
              f"(step {nano['logged_step']}, 20 random batches)")
        print(f"  exact val      : {nano['exact_val_loss']:8.4f}   (evaluate_split, every val token once)")
    else:
        print("nanoGPT run      : skipped (--skip-nanogpt)")
    fields = {"corpus": ours["recipe"]["corpus"], **ours["recipe"]["model"], **ours["recipe"]["train"]}
    recipe = ", ".join(f"{k}={v}" for k, v in fields.items())
    print(f"ours             : recipe {ours['recipe_name']}: {recipe}")
    print(f"  run            : {ours['parameters']:,} parameters, {ours['precision']} on {ours['device']}, "
          f"{ours['torch_threads']} torch threads, training {ours['train_seconds']:.1f} s of the process")
    print(f"  process wall   : {ours['process_seconds']:8.1f} s")
    print(f"  logged val     : {ours['logged_val_loss']:8.4f}   (step {ours['logged_step']}, "
          "the recipe's fixed batches)")
    print(f"  exact val      : {ours['exact_val_loss']:8.4f}   (evaluate_split, every val token once)")
    if goal["ratio"] is None:
        print("goal             : not decided (no nanoGPT result)")
    else:
        print(f"wall ratio       : {goal['ratio']:.3f} (ours / nanoGPT)")
        print(f"goal             : {'MET' if goal['goal_met'] else 'NOT MET'}: exact loss ours <= nanoGPT "
              f"{'yes' if goal['loss_ok'] else 'no'}, wall ratio <= {GOAL_RATIO} "
              f"{'yes' if goal['time_ok'] else 'no'}")
    if result["smoke_test"]:
        print("note             : shortened runs (--nanogpt-iters / --ours-steps): "
              "a smoke test, not a result")
    print("=" * 100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("nanogpt", type=Path, nargs="?", default=None,
                        help="a checkout of karpathy/nanoGPT (e.g. commit 3adf61e)")
    parser.add_argument("--recipe", default="1min",
                        help="one of lessons_lib.pretrained.RECIPES (default 1min)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both runs (OMP_NUM_THREADS; torch.set_num_threads in ours)")
    parser.add_argument("--nanogpt-iters", type=int, default=2000,
                        help="nanoGPT's --max_iters and --lr_decay_iters (the README's 2000)")
    parser.add_argument("--ours-steps", type=int, default=None,
                        help="shorten the course's recipe to this many steps (a smoke test)")
    parser.add_argument("--skip-nanogpt", action="store_true", help="run and report only the course's side")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load nanoGPT's checkpoint with weights_only=False "
                             "(only if weights_only=True fails)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--_run-ours", dest="run_ours", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("threads", "nanogpt_iters", "ours_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int, got {value}")

    if args.run_ours:
        train_ours(args.recipe, args.ours_steps, args.threads, args.run_ours)
        return

    from lessons_lib.pretrained import shakespeare_data

    if args.nanogpt is None and not args.skip_nanogpt:
        parser.error("the path of a nanoGPT checkout is required (or --skip-nanogpt)")
    checkout = check_checkout(args.nanogpt) if args.nanogpt is not None else None
    course_recipe(args.recipe, args.ours_steps)                 # fail early on an unknown name
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, train_ids, val_ids = shakespeare_data()
    workdir = Path(tempfile.mkdtemp(prefix="vs_nanogpt-"))
    try:
        nano = None
        if not args.skip_nanogpt:
            prepare_workdir(checkout, workdir, tokenizer, train_ids, val_ids)
            nano = run_nanogpt(workdir, args.nanogpt_iters, args.threads)
            score_nanogpt(nano, workdir, val_ids, tokenizer.vocab_size, args.trust_checkpoint)
        ours = run_ours(args.recipe, args.ours_steps, args.threads, workdir)
    finally:
        if args.keep:
            print(f"(kept the working directory {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "machine": cpu_info(), "nanogpt_path": str(checkout) if checkout else None,
        "nanogpt_checkout": git_commit(checkout) if checkout else {"commit": None, "dirty": None},
        "threads_setting": (f"--threads {args.threads} (OMP_NUM_THREADS for both)" if args.threads
                            else f"default threads ({torch.get_num_threads()} in this process)"),
        "corpus": {"vocab_size": tokenizer.vocab_size, "train_tokens": len(train_ids),
                   "val_tokens": len(val_ids)},
        "smoke_test": args.nanogpt_iters != 2000 or bool(args.ours_steps),
        "nanogpt": nano, "ours": ours, "verdict": verdict(ours, nano),
    }
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
