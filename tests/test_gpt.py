"""lessons_lib.model.GPT: parameter counts, Hugging Face GPT-2 equivalence, causality, errors."""

import json

import pytest
import torch

from lessons_lib.model import GPT, GPTConfig, count_parameters

TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)


# -- parameter counts --------------------------------------------------------------------

@pytest.mark.parametrize("size, expected", [("small", 124_439_808), ("medium", 354_823_168),
                                            ("large", 774_030_080), ("xl", 1_557_611_200)])
def test_gpt2_counts_match_hugging_face(size, expected):
    assert count_parameters(GPTConfig.gpt2(size)) == expected


def test_gpt1_is_117m_within_one_percent():
    assert abs(count_parameters(GPTConfig.gpt1()) / 117e6 - 1) < 0.01


@pytest.mark.parametrize("name, label", [("small", 125e6), ("medium", 350e6), ("large", 760e6),
                                         ("xl", 1.3e9), ("2.7b", 2.7e9), ("6.7b", 6.7e9),
                                         ("13b", 13e9), ("175b", 175e9)])
def test_gpt3_counts_within_2_5_percent_of_the_labels(name, label):
    assert abs(count_parameters(GPTConfig.gpt3(name)) / label - 1) < 0.025


@pytest.mark.parametrize("config", [GPTConfig.gpt1(), GPTConfig.gpt2("xl"), GPTConfig.gpt3("13b"),
                                    GPTConfig.gpt3("175b"), TINY,
                                    GPTConfig(vocab_size=50, block_size=8, n_layer=3, n_head=2, n_embd=16,
                                              bias=False, tie_weights=False),
                                    GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                              positions="sinusoidal")])
def test_formula_equals_counting_a_model_on_the_meta_device(config):
    with torch.device("meta"):
        model = GPT(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    parts = count_parameters(config, split=True)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


# -- Hugging Face GPT-2 with the same weights --------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():               # random biases and norms too, so that no weight goes unchecked
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.slow
def test_logits_and_greedy_tokens_match_hugging_face(hf_folder):
    folder, hf = hf_folder
    ours = GPT.from_hf_gpt2(folder).eval()
    idx = torch.randint(97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    from lessons_lib.generate import generate
    hf_tokens = hf.generate(idx[:, :5], max_new_tokens=20, do_sample=False, pad_token_id=0,
                            attention_mask=torch.ones_like(idx[:, :5]))
    assert torch.equal(generate(ours, idx[:, :5], 20, greedy=True), hf_tokens)


def test_loading_keys_without_the_transformer_prefix(hf_folder, tmp_path):
    from safetensors.torch import load_file, save_file
    folder, hf = hf_folder
    state = load_file(str(folder / "model.safetensors"))
    stripped = {k.removeprefix("transformer."): v.contiguous() for k, v in state.items() if k != "lm_head.weight"}
    save_file(stripped, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    a, b = GPT.from_hf_gpt2(folder), GPT.from_hf_gpt2(tmp_path)
    idx = torch.arange(10)[None]
    assert torch.equal(a(idx)[0], b(idx)[0])


def test_loader_errors(tmp_path, hf_folder):
    with pytest.raises(ValueError, match="no config.json"):
        GPT.from_hf_gpt2(tmp_path)
    folder, _ = hf_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="neither model.safetensors"):
        GPT.from_hf_gpt2(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gelu"):
        GPT.from_hf_gpt2(tmp_path)


# -- the model itself --------------------------------------------------------------------

def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(97, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(97, (2, 7))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_loss_is_cross_entropy_and_ignores_minus_100():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(97, (2, 8))
    targets = torch.randint(97, (2, 8))
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1)))
    targets[:, :4] = -100
    _, masked = model(idx, targets)
    torch.testing.assert_close(masked, torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97),
                                                                         targets[:, 4:].reshape(-1)))


def test_fresh_model_loss_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(TINY)
    _, loss = model(torch.randint(97, (4, 32)), torch.randint(97, (4, 32)))
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.1


def test_residual_projections_get_the_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=8, n_head=4, n_embd=256))
    std = model.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001
    assert abs(model.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002


def test_bad_inputs():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0\.\.96, got ids from 0 to 97"):
        model(torch.tensor([[0, 97]]))
    with pytest.raises(ValueError, match="from -1"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="shape of idx"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible"):
        GPT(GPTConfig(n_embd=30, n_head=4, vocab_size=10, block_size=4, n_layer=1))
    with pytest.raises(ValueError, match="GPT-2 sizes"):
        GPTConfig.gpt2("huge")
    with pytest.raises(ValueError, match="GPT-3 models"):
        GPTConfig.gpt3("1t")
    with pytest.raises(ValueError, match="positions"):
        GPTConfig(positions="rotary")
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
