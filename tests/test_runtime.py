"""lessons_lib.runtime: the device, the precision and the threads, decided in one place."""

from __future__ import annotations

import pytest
import torch

from lessons_lib import runtime as rt
from lessons_lib.runtime import (autocast, choose_device, choose_precision, cpu_flags, cpu_has_native_bf16,
                                 cpu_model, one_thread, runtime, use_threads)

# Abridged /proc/cpuinfo of the two kinds of machine the course runs on.
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes
"""
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
COOPER_LAKE = "model name\t: Intel(R) Xeon(R) Cooper Lake\nflags\t\t: avx2 avx512f avx512_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


def test_flags_and_model_are_read_from_cpuinfo():
    assert "avx2" in cpu_flags(AVX2_ONLY) and "avx512_bf16" not in cpu_flags(AVX2_ONLY)
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(SAPPHIRE_RAPIDS)
    assert "asimd" in cpu_flags(ARM)
    assert cpu_flags("no flags here") is None
    assert cpu_model(AVX2_ONLY) == "AMD EPYC"
    assert cpu_model(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8480+"


@pytest.mark.parametrize("cpuinfo, native", [(AVX2_ONLY, False), (SAPPHIRE_RAPIDS, True),
                                             (COOPER_LAKE, True), (ARM, False)])
def test_native_bf16_follows_the_flags(cpuinfo, native):
    flags = cpu_flags(cpuinfo)
    assert cpu_has_native_bf16(flags) is native
    precision, reason = choose_precision("cpu", flags=flags, environ={})
    assert precision == ("bf16" if native else "fp32")
    assert ("no native" in reason) is not native and ("natively" in reason) is native


def test_without_cpuinfo_pytorchs_probe_decides(monkeypatch):
    monkeypatch.setattr(rt, "CPUINFO", rt.Path("/nonexistent/cpuinfo"))
    assert cpu_flags() is None
    monkeypatch.setattr(rt, "_torch_probe", lambda: True)
    assert cpu_has_native_bf16() is True
    monkeypatch.setattr(rt, "_torch_probe", lambda: False)
    assert cpu_has_native_bf16() is False


def test_the_probe_agrees_with_this_machines_flags():
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo here")
    assert cpu_has_native_bf16(flags) == rt._torch_probe()


@pytest.mark.parametrize("value, expected", [("fp32", "fp32"), ("bf16", "bf16"), ("BF16", "bf16"),
                                             (" fp32 ", "fp32")])
def test_the_environment_variable_overrides_the_flags(value, expected):
    for cpuinfo in (AVX2_ONLY, SAPPHIRE_RAPIDS):
        precision, reason = choose_precision("cpu", flags=cpu_flags(cpuinfo),
                                             environ={"LESSONS_LIB_PRECISION": value})
        assert precision == expected and "LESSONS_LIB_PRECISION" in reason


def test_auto_or_empty_in_the_environment_means_the_flags_decide():
    for value in ("auto", "", "AUTO"):
        env = {"LESSONS_LIB_PRECISION": value}
        assert choose_precision("cpu", flags=cpu_flags(AVX2_ONLY), environ=env)[0] == "fp32"
        assert choose_precision("cpu", flags=cpu_flags(SAPPHIRE_RAPIDS), environ=env)[0] == "bf16"


def test_an_explicit_request_beats_the_environment():
    env = {"LESSONS_LIB_PRECISION": "bf16"}
    assert choose_precision("cpu", "fp32", flags=cpu_flags(SAPPHIRE_RAPIDS), environ=env) == ("fp32", "asked for fp32")


def test_bad_values_are_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="LESSONS_LIB_PRECISION must be one of 'fp32', 'bf16' or 'auto'"):
        choose_precision("cpu", environ={"LESSONS_LIB_PRECISION": "fp16"})
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("cpu", "half", environ={})
    with pytest.raises(ValueError, match="unknown device"):
        choose_device("tpu9")
    with pytest.raises(ValueError, match="device must be"):
        choose_device(3)
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        autocast("cpu", "auto")
    with pytest.raises(ValueError, match="thread count"):
        use_threads(0).__enter__()


def test_mps_is_never_bf16_and_never_chosen_unasked(monkeypatch):
    assert choose_precision(torch.device("mps"), environ={})[0] == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")
    assert choose_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_follows_its_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_device() == torch.device("cuda")
    assert choose_precision("auto", environ={})[0] == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("cuda", environ={})[0] == "fp32"


def test_runtime_describes_this_machine(monkeypatch):
    monkeypatch.delenv("LESSONS_LIB_PRECISION", raising=False)
    r = runtime("cpu")
    assert r.device == "cpu" and r.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert r.threads == rt.default_threads() and r.cpu and r.capability
    assert r.precision in r.describe() and r.reason in r.describe()
    monkeypatch.setenv("LESSONS_LIB_PRECISION", "bf16")
    assert runtime("cpu").bf16


def test_autocast_computes_matmuls_in_the_chosen_precision():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu", "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with runtime("cpu", "fp32").autocast():
        assert (a @ b).dtype == torch.float32


def test_thread_contexts_restore_the_count():
    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with use_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_time_interleaved_runs_each_function_in_rounds_and_reports_the_best():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    result = rt.time_interleaved(fns, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4                      # warmup round, then 3 interleaved rounds
    assert set(result) == {"a", "b", "spread"} and set(result["spread"]) == {"a", "b"}


def test_time_interleaved_sees_which_is_slower(monkeypatch):
    clock = [0.0]
    # a clock that moves only inside the functions: the answer does not depend on the load
    monkeypatch.setattr(rt.time, "perf_counter", lambda: clock[0])
    costs = {"fast": iter([1e-3, 2e-3, 1e-3, 3e-3]), "slow": iter([1e-2, 4e-2, 2e-2, 1e-2])}

    def work(name):
        def run():
            clock[0] += next(costs[name])
        return run

    result = rt.time_interleaved({"fast": work("fast"), "slow": work("slow")}, repeats=3)
    assert result["fast"] == pytest.approx(1e-3) and result["slow"] == pytest.approx(1e-2)
    assert result["spread"] == pytest.approx({"fast": 3.0, "slow": 4.0})


def test_time_interleaved_times_number_calls_in_a_row_per_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(rt.time, "perf_counter", lambda: clock[0])
    calls = []

    def step():                      # 1 ms a call, and a 40 ms hiccup in the second round
        calls.append(1)
        clock[0] += 0.041 if len(calls) == 1 + 10 + 5 else 0.001

    result = rt.time_interleaved({"step": step}, repeats=3, number=10)
    assert len(calls) == 1 + 3 * 10                  # one warm-up call, then 3 rounds of 10
    assert result["step"] == pytest.approx(1e-3)     # per call, in the best round
    assert result["spread"]["step"] == pytest.approx(5.0)    # (10 + 40) / 10 ms


def test_time_interleaved_sees_a_real_sleep():
    import time
    result = rt.time_interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, repeats=3)
    assert result["slow"] >= 0.009                 # a sleep never ends early; load only adds time


def test_time_interleaved_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty dict"):
        rt.time_interleaved({})
    with pytest.raises(ValueError, match="non-empty dict"):
        rt.time_interleaved({"a": 3})
    with pytest.raises(ValueError, match="repeats"):
        rt.time_interleaved({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError, match="number"):
        rt.time_interleaved({"a": lambda: None}, number=0)
    with pytest.raises(ValueError, match="spread"):
        rt.time_interleaved({"spread": lambda: None})


def test_small_models_train_on_one_thread():
    assert rt.threads_for(100_000) == 1
    assert rt.threads_for(rt.SMALL_MODEL_PARAMETERS) == rt.default_threads()
    for bad in (0, -5, 2.5, True, "many"):
        with pytest.raises(ValueError, match="n_parameters"):
            rt.threads_for(bad)


def test_thread_count_depends_on_the_cores_and_the_variable_only(monkeypatch):
    monkeypatch.setattr(rt, "cpu_cores", lambda: 4)
    assert rt.threads_for(10_000_000, environ={}) == 4
    assert rt.threads_for(10_000_000, environ={rt.THREADS_VAR: " 3 "}) == 3
    assert rt.threads_for(100_000, environ={rt.THREADS_VAR: "3"}) == 1
    # a busy machine changes nothing: /proc/loadavg is not read
    monkeypatch.setattr(rt.Path, "read_text", lambda *a, **k: "9.0 9.0 9.0 9/300 1")
    assert rt.threads_for(10_000_000, environ={}) == 4
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=rt.THREADS_VAR):
            rt.default_threads(environ={rt.THREADS_VAR: bad})


def test_runtime_reports_the_training_threads_not_the_current_setting():
    with use_threads(1):
        assert runtime().threads == rt.default_threads()


def _train_once(data):
    from lessons_lib.model import GPT, GPTConfig
    from lessons_lib.train import TrainConfig, train

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=128))
    config = TrainConfig(max_steps=8, batch_size=8, block_size=32, lr=1e-3, warmup_steps=2,
                         eval_interval=8, eval_batches=1, precision="auto", progress=False)
    history = train(model, data, config)
    return model.state_dict(), history


@pytest.mark.slow
def test_the_same_seed_gives_the_same_weights_beside_a_busy_process():
    """Same seed, same machine: the same weights bit for bit, whether or not another program
    keeps a core busy (the thread count must not follow the machine's load)."""
    import subprocess
    import sys

    g = torch.Generator().manual_seed(1)
    data = (torch.randint(65, (4_000,), generator=g), torch.randint(65, (1_000,), generator=g))
    quiet, quiet_history = _train_once(data)
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 120\n"
                             "while time.time() < end:\n    pass"])
    try:
        import time
        time.sleep(0.3)                       # the busy loop is running
        loaded, loaded_history = _train_once(data)
    finally:
        busy.kill()
        busy.wait()
    n_params = sum(v.numel() for v in quiet.values())
    assert n_params > rt.SMALL_MODEL_PARAMETERS    # a model that trains on every core
    assert quiet_history.threads == loaded_history.threads == rt.default_threads()
    assert quiet_history.train_loss == loaded_history.train_loss
    for name, tensor in quiet.items():
        assert torch.equal(tensor, loaded[name]), name
