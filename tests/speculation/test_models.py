"""Model resolution: clear errors, tokenizer agreement, the packaged default."""

import pytest

from speculation.errors import ModelNotFoundError, TokenizerMismatchError
from speculation.models import ModelConfig, check_same_tokenizer, resolve_model_path
from tinymodels import TinyTokenizer


def test_unknown_model_names_what_was_looked_for():
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'.*nothing is downloaded"):
        resolve_model_path("no-such-model")
    with pytest.raises(ModelNotFoundError, match="unknown model 'someone/absent'"):
        resolve_model_path("someone/absent")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_local_directory_round_trip(tmp_path):
    from tinymodels import tiny_llama

    tiny_llama(seed=0).save_pretrained(tmp_path)
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_draft_with_other_tokenizer_is_rejected():
    check_same_tokenizer(TinyTokenizer(10), TinyTokenizer(10), "same")
    with pytest.raises(TokenizerMismatchError, match="does not share the target's tokenizer"):
        check_same_tokenizer(TinyTokenizer(10), TinyTokenizer(12), "other")


def test_dtype_and_device_defaults():
    import torch

    cfg = ModelConfig(device="cpu")
    assert cfg.resolved_dtype() == torch.float32
    assert ModelConfig(device="cuda").resolved_dtype() == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelConfig(dtype="int3").resolved_dtype()
