"""The Wan pipeline folder's text encoder (models.wan.WanTextEncoder, model.text_encoder=auto|pretrained)
through transformers, with no model hub: a tiny random UMT5EncoderModel and a word-level tokenizer made
here are saved as text_encoder/ and tokenizer/ beside the tiny random Wan transformer that
test_wan_adapter.py builds.

Checked against UMT5EncoderModel itself (tokens written out by hand, not by the tokenizer under test)
and against diffusers' own WanPipeline.encode_prompt. Needs transformers and diffusers (skipped
without them).

`ddrl data prepare --text-encoder diffusers:<tokens>:<folder>` stores the same embeddings in the shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (the diffusers extra: "
                                                          "pip install transformers==5.23.0)")
tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers (installed with transformers)")

# the tiny random Wan folder (transformer/, scheduler/) and the overrides of a Wan run; importing the
# module also skips this one without diffusers
import test_wan_adapter  # noqa: E402
from test_wan_adapter import TINY_WAN, _wan_overrides, diffusers  # noqa: E402

from ddrl_scale.config import ConfigError, load_config  # noqa: E402
from ddrl_scale.models import build_text_encoder  # noqa: E402
from ddrl_scale.models.text import HashTextEncoder  # noqa: E402
from ddrl_scale.models.wan import WanTextEncoder  # noqa: E402
from ddrl_scale.train.run import run_training  # noqa: E402

PAD, EOS, UNK = 0, 1, 2  # T5's ids: pad 0 (also the decoder start), eos 1, unk 2
WORDS = ["a", "red", "cat", "blue", "dog", "runs", "on", "the", "green", "grass", "under", "sky", "&",
         "video", "of", "orbit", "star", "circle", "moving", "bright", "dark", "square", "left", "right"]
VOCAB = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK, **{word: index + 3 for index, word in enumerate(WORDS)}}
MAX_TOKENS = 12  # conftest's model.max_text_tokens, which the Wan run overrides keep
# a UMT5 encoder shrunk; d_model must be the Wan transformer's text_dim (model.text_dim of the run)
UMT5 = dict(vocab_size=len(VOCAB), d_model=TINY_WAN["text_dim"], d_kv=4, d_ff=16, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=PAD,
            eos_token_id=EOS, decoder_start_token_id=PAD)
wan_folder = test_wan_adapter.wan_folder  # its module-scoped fixture, registered in this module too

PROMPTS = ["a red cat", "blue dog runs on the green grass under the sky a red cat runs", "sky", "dog &"]


def _save_text_parts(folder: Path) -> None:
    """tokenizer/ (word level, eos appended like T5's) and text_encoder/ (random UMT5) into `folder`."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>",
                                                                      special_tokens=[("</s>", EOS)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                     eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    torch.manual_seed(1)
    encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5))
    encoder.save_pretrained(str(folder / "text_encoder"))


@pytest.fixture(scope="module")
def text_folder(wan_folder, tmp_path_factory) -> Path:
    """The tiny Wan folder plus tokenizer/ and text_encoder/ (a copy: wan_folder stays without them)."""
    folder = tmp_path_factory.mktemp("wan_text") / "Wan2.1-tiny"
    shutil.copytree(wan_folder, folder)
    _save_text_parts(folder)
    return folder


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """Everything is read from the folders: any attempt to reach the model hub fails at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _hand_tokens(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and mask written out from VOCAB: words, truncated to leave room for eos, eos, pads."""
    rows = [[VOCAB.get(word, UNK) for word in prompt.split()][:MAX_TOKENS - 1] + [EOS] for prompt in prompts]
    ids = torch.tensor([row + [PAD] * (MAX_TOKENS - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (MAX_TOKENS - len(row)) for row in rows])
    return ids, mask


# -- the encoder -------------------------------------------------------------------------------------
def test_encode_is_the_encoders_last_hidden_state(text_folder):
    """encode == UMT5EncoderModel(ids, mask).last_hidden_state with zeros past each prompt's tokens
    (prompt, eos), shape (B, max_tokens, d_model); the long prompt is cut to max_tokens."""
    encoder = WanTextEncoder(text_folder, MAX_TOKENS)
    got = encoder.encode(PROMPTS)
    assert got.shape == (len(PROMPTS), MAX_TOKENS, UMT5["d_model"]) and got.dtype == torch.float32
    ids, mask = _hand_tokens(PROMPTS)
    model = transformers.UMT5EncoderModel.from_pretrained(str(text_folder / "text_encoder")).eval()
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, hidden * mask[..., None])
    lengths = mask.sum(dim=1).tolist()
    assert lengths == [4, MAX_TOKENS, 2, 3]
    for row, length in zip(got, lengths):
        assert (row[:length].abs().sum(dim=1) > 0).all() and (row[length:] == 0).all()
    # the padding is masked out: a prompt alone, with a longer pad, has the same embeddings
    alone = WanTextEncoder(text_folder, 2 * MAX_TOKENS).encode(PROMPTS[:1])
    torch.testing.assert_close(alone[0, :4], got[0, :4])
    assert (alone[0, 4:] == 0).all()


def test_encode_matches_the_diffusers_wan_pipeline(text_folder):
    """diffusers' WanPipeline.encode_prompt with the same tokenizer and encoder gives the same
    embeddings, also for captions with extra whitespace and HTML entities (which both clean)."""
    encoder = WanTextEncoder(text_folder, MAX_TOKENS)
    pipeline = diffusers.WanPipeline(tokenizer=encoder.tokenizer, text_encoder=encoder.model, vae=None,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    prompts = [*PROMPTS, "  a red\n\ncat  &amp; dog ", "red &amp;amp; blue\t"]
    expected, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False,
                                         max_sequence_length=MAX_TOKENS, device=torch.device("cpu"))
    assert torch.equal(encoder.encode(prompts), expected)
    assert WanTextEncoder.clean("  a red\n\ncat  &amp; dog ") == "a red cat & dog"


def test_encode_to_a_device_and_no_gradients(text_folder):
    encoder = WanTextEncoder(text_folder, MAX_TOKENS)
    assert not any(parameter.requires_grad for parameter in encoder.model.parameters())
    assert not encoder.model.training
    assert encoder.encode(PROMPTS[:1], torch.device("cpu")).device == torch.device("cpu")


# -- choosing it ------------------------------------------------------------------------------------
def test_build_text_encoder_picks_the_folders_encoder(text_folder, wan_folder, tmp_path, shared_shards_dir):
    """auto: the folder's encoder when text_encoder/ is there, else the hash encoder; hash: always
    the hash encoder; pretrained without the folders: an error that names the setting and folder."""
    def build(folder: Path, setting: str):
        overrides = [*_wan_overrides(folder, tmp_path, shared_shards_dir), f"model.text_encoder={setting}"]
        return build_text_encoder(load_config(None, overrides))

    assert isinstance(build(text_folder, "auto"), WanTextEncoder)
    assert isinstance(build(text_folder, "pretrained"), WanTextEncoder)
    assert isinstance(build(text_folder, "hash"), HashTextEncoder)
    assert isinstance(build(wan_folder, "auto"), HashTextEncoder)
    with pytest.raises(FileNotFoundError, match=r"model.text_encoder=pretrained: .* has no text_encoder/"):
        build(wan_folder, "pretrained")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(text_folder, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer/ folder"):
        build(no_tokenizer, "auto")
    # an encoder whose width is not model.text_dim is refused when it is built, naming the key
    with pytest.raises(ConfigError, match=r"model.text_dim.*expected 8"):
        build_text_encoder(load_config(None, [*_wan_overrides(text_folder, tmp_path, shared_shards_dir),
                                              "model.text_encoder=pretrained", "model.text_dim=16"]))


def test_unknown_architecture_is_a_clear_error(text_folder, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(text_folder, folder, ignore=shutil.ignore_patterns("transformer"))
    config_path = folder / "text_encoder" / "config.json"
    config = {**json.loads(config_path.read_text()), "architectures": ["NoSuchModel"]}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'NoSuchModel', which this transformers does not have"):
        WanTextEncoder(folder, MAX_TOKENS)


# -- a run -----------------------------------------------------------------------------------------
def test_a_wan_run_trains_with_the_pretrained_text_encoder(text_folder, tmp_path, shared_shards_dir,
                                                          monkeypatch):
    """`ddrl train` (run_training, one process, 2 steps, evaluation on) with
    model.text_encoder=pretrained: every prompt and caption goes through the folder's UMT5, and the
    losses are finite."""
    seen: list[str] = []
    encode = WanTextEncoder.encode

    def spy(self, prompts, device="cpu"):
        seen.extend(prompts)
        return encode(self, prompts, device)

    monkeypatch.setattr(WanTextEncoder, "encode", spy)
    run_dir = tmp_path / "run"
    overrides = [*_wan_overrides(text_folder, run_dir, shared_shards_dir), "model.text_encoder=pretrained",
                 "train.eval_prompts=2"]
    summary = run_training(load_config(None, overrides))
    assert summary["steps"] == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2]
    for record in metrics:
        for key in ("loss", "policy_loss", "data_loss"):
            assert torch.isfinite(torch.tensor(record[key])), (key, record)
    # at least the captions of both steps' data loss (algo.prompts_per_step=2) and the evaluation
    assert len(seen) >= 2 * 2 + 2 and all(isinstance(prompt, str) and prompt for prompt in seen)
    assert (run_dir / "eval_after.json").is_file()


def test_prepare_stores_the_wan_encoders_caption_embeddings(text_folder, tmp_path):
    """mp4 -> `ddrl data prepare --text-encoder diffusers:12:<folder>` -> each sample's stored text is
    WanTextEncoder.encode of its caption (in the shards' fp16)."""
    from test_data_prepare import make_videos

    from ddrl_scale.data import prepare as prepare_module
    from ddrl_scale.data.latent_shards import decode_sample, iter_shard

    make_videos(tmp_path / "videos", 3)
    settings = prepare_module.PrepareSettings(num_frames=4, height=8, width=8, samples_per_shard=4,
                                              text_encoder=f"diffusers:{MAX_TOKENS}:{text_folder}")
    prepare_module.prepare(str(tmp_path / "videos"), tmp_path / "anchor", settings)
    encoder = WanTextEncoder(text_folder, MAX_TOKENS)
    seen = 0
    for shard in sorted((tmp_path / "anchor").glob("*.tar")):
        for raw in iter_shard(str(shard)):
            sample = decode_sample(raw.key, raw.members)
            text = sample.text
            assert text.dtype == torch.float16 and text.shape == (MAX_TOKENS, UMT5["d_model"])
            assert torch.equal(text, encoder.encode([sample.caption])[0].half()), raw.key
            seen += 1
    assert seen == 3
