"""lessons_lib.distributed and train() under torchrun: two gloo processes on this machine train
the same weights as one process on the combined batch."""

import json
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lessons_lib import distributed
from lessons_lib.model import GPT, GPTConfig
from lessons_lib.train import TrainConfig, train

TINY = dict(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=32)
STEPS = 20

# the script each process runs; the test trains the same model in one process to compare
WORKER = textwrap.dedent(f"""
    import sys
    import torch
    from lessons_lib import distributed
    from lessons_lib.model import GPT, GPTConfig
    from lessons_lib.train import TrainConfig, save_checkpoint, train

    out, batch_size = sys.argv[1], int(sys.argv[2])
    with distributed.process_group() as (rank, world):
        ids = torch.randint(0, 30, (5000,), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{TINY!r}))
        config = TrainConfig(max_steps={STEPS}, batch_size=batch_size, block_size=16,
                             warmup_steps=5, eval_interval=10, eval_batches=2,
                             progress=False, threads=1)
        history = train(model, (ids[:4000], ids[4000:]), config)
        if rank == 0:
            save_checkpoint(model, out, {{"world": world, "loss": history.train_loss,
                                          "val": history.val_loss, "tokens": history.tokens}})
""")


def one_process(batch_size=8):
    ids = torch.randint(0, 30, (5000,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    config = TrainConfig(max_steps=STEPS, batch_size=batch_size, block_size=16, warmup_steps=5,
                         eval_interval=10, eval_batches=2, progress=False, threads=1)
    return model, train(model, (ids[:4000], ids[4000:]), config)


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one_process_on_the_combined_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "two.safetensors"
    distributed.launch(script, 2, [out, 8])
    two = load_file(str(out))
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["lessons_lib"])
    model, history = one_process(batch_size=8)
    one = model.state_dict()
    assert meta["world"] == 2 and meta["tokens"] == history.tokens == STEPS * 8 * 16
    # the same training up to the order of float32 additions (measured: ~3e-6 after 30 steps)
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-4
    assert meta["loss"] == pytest.approx(history.train_loss, abs=1e-4)
    assert meta["val"] == pytest.approx(history.val_loss, abs=1e-4)
    # and not trivially: training moved the weights far more than that
    torch.manual_seed(0)
    start = GPT(GPTConfig(**TINY)).state_dict()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 100 * worst


# The second half of every global batch (rank 1's rows) counts only its first 2 targets, as
# fine-tuning does with prompt tokens (-100): the ranks count 64 and 8 targets of each batch.
MASKED = textwrap.dedent(f"""
    import sys
    import torch
    from lessons_lib import distributed
    from lessons_lib.model import GPT, GPTConfig
    from lessons_lib.train import TrainConfig, get_batch, save_checkpoint, train

    def masked_batches(ids):
        def batch_fn(split, generator):
            x, y = get_batch(ids[split], 8, 16, generator, "cpu")
            y = y.clone()
            y[4:, 2:] = -100
            return x, y
        return batch_fn

    def run(ids):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{TINY!r}))
        config = TrainConfig(max_steps={STEPS}, batch_size=8, block_size=16,
                             warmup_steps=5, eval_interval=10, eval_batches=2,
                             progress=False, threads=1)
        return model, train(model, masked_batches(ids), config)

    if __name__ == "__main__":
        out = sys.argv[1]
        with distributed.process_group() as (rank, world):
            ids = torch.randint(0, 30, (5000,), generator=torch.Generator().manual_seed(0))
            model, history = run({{"train": ids[:4000], "val": ids[4000:]}})
            if rank == 0:
                save_checkpoint(model, out, {{"loss": history.train_loss}})
""")


@pytest.mark.slow
def test_with_ignored_targets_two_processes_still_follow_the_global_token_mean(tmp_path):
    """Each rank's loss is a mean over its own counted targets; weighed by their share, the
    two processes train what one process trains on the whole batch."""
    import importlib.util
    script = tmp_path / "masked.py"
    script.write_text(MASKED)
    out = tmp_path / "two.safetensors"
    distributed.launch(script, 2, [out])
    two = load_file(str(out))
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["lessons_lib"])
    spec = importlib.util.spec_from_file_location("masked", script)
    masked = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(masked)
    ids = torch.randint(0, 30, (5000,), generator=torch.Generator().manual_seed(0))
    model, history = masked.run({"train": ids[:4000], "val": ids[4000:]})
    one = model.state_dict()
    worst = max((two[k] - one[k]).abs().max().item() for k in one)
    assert worst < 1e-4
    assert meta["loss"] == pytest.approx(history.train_loss, abs=1e-4)


@pytest.mark.slow
def test_a_global_batch_that_does_not_split_over_the_processes_fails_clearly(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with pytest.raises(RuntimeError, match="multiple of the 2 processes"):
        distributed.launch(script, 2, [tmp_path / "x.safetensors", 7])


def test_without_a_group_everything_is_one_plain_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.process_group() as ranks:
        assert ranks == (0, 1)
        assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 0 + 1, 0)
        assert distributed.is_main() and not distributed.is_distributed()
        assert distributed.all_reduce_mean(torch.tensor(2.5)) == 2.5


def test_shard_gives_each_rank_its_own_equal_rows():
    batch = torch.arange(12).reshape(6, 2)
    parts = [distributed.shard(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    assert torch.equal(parts[1], torch.tensor([[4, 5], [6, 7]]))
    assert torch.equal(distributed.shard(batch, 0, 1), batch)


def test_backend_follows_the_device():
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda") == "nccl"
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"


@pytest.mark.parametrize("call, match", [
    (lambda: distributed.shard(torch.zeros(5, 2), 0, 2), "does not split evenly"),
    (lambda: distributed.shard(torch.zeros(4, 2), 2, 2), "rank must be"),
    (lambda: distributed.shard(torch.zeros(4, 2), 0, 0), "world_size"),
    (lambda: distributed.shard(torch.tensor(3.0), 0, 1), "batch dimension"),
    (lambda: distributed.launch("/no/such/script.py", 2), "no script"),
    (lambda: distributed.launch(__file__, 0), "nproc"),
    (lambda: distributed.launch(__file__, 2, threads=0), "threads"),
    (lambda: distributed.setup(backend="mpi"), "backend"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_an_incomplete_torchrun_environment_is_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="incomplete"):
        distributed.setup()
