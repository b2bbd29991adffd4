"""What the server checks before it loads anything heavy: its flags (parsed without importing
torch), a model folder that exists and holds a tokenizer, and a GPU for every tensor-parallel
rank of this machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from ocula.config import EngineArgs
from ocula.distributed.launch import check_devices_for_ranks
from ocula.engine.model_setup import resolve_model
from ocula.utils.tokenizer import load_tokenizer
from tests.helpers.server import free_port


def test_a_folder_without_tokenizer_files_is_refused(tiny_checkpoint, tmp_path) -> None:
    """transformers builds a one-token tokenizer from config.json alone: every prompt would
    tokenize to nothing and every request get a misleading 400."""
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_checkpoint("qwen2"), folder)
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            path.unlink()
    with pytest.raises(ValueError, match="holds no usable tokenizer"):
        load_tokenizer(folder)
    assert len(load_tokenizer(tiny_checkpoint("qwen2"))) > 1


def test_a_model_dir_that_does_not_exist_says_so(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        resolve_model(EngineArgs(model_dir=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        resolve_model(EngineArgs(model_dir=str(tmp_path)))


def test_more_ranks_than_gpus_are_refused_before_the_group_waits(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"2 ranks on this machine.*sees 1 CUDA device"):
        check_devices_for_ranks(torch.device("cuda"), 2)
    check_devices_for_ranks(torch.device("cuda"), 1)
    check_devices_for_ranks(torch.device("cpu"), 4)  # CPU ranks share the host


@pytest.mark.parametrize(
    "model_type,architecture",
    [("qwen2_vl", "Qwen2VLForConditionalGeneration"), ("gpt2", "GPT2LMHeadModel")],
)
def test_an_unsupported_architecture_is_named_as_the_config_is_read(
    tmp_path, model_type, architecture
) -> None:
    """Before: an AttributeError on a field such a config lacks (vocab_size, intermediate_size),
    from the engine, seconds after the start."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": model_type, "architectures": [architecture]})
    )
    with pytest.raises(ValueError, match=f"unsupported model architecture.*{architecture}"):
        resolve_model(EngineArgs(model_dir=str(tmp_path)))


def test_a_config_that_is_not_json_is_named(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        resolve_model(EngineArgs(model_dir=str(tmp_path)))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        resolve_model(EngineArgs(model_dir=str(tmp_path)))


def test_the_server_parses_its_flags_and_opens_the_channel_without_torch(tmp_path) -> None:
    """The front parses its flags, binds its port and spawns the engine process before it
    imports anything heavy (`ocula.server.engine_launch`): both processes then import torch at
    once, and a bad flag is refused at once. Here any import of torch and the other heavy
    packages raises, and `main` runs up to the engine's launch (replaced by a stand-in that
    opens the real channel listener and stops there)."""
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'tokenizers', 'safetensors', 'huggingface_hub',\n"
        "             'fastapi', 'starlette', 'pydantic', 'numpy', 'PIL'):\n"
        "    sys.modules[name] = None\n"
        "import ocula.server.api_server as api_server\n"
        "from ocula.server.channel_listener import ChannelListener\n"
        "class Launched(Exception):\n"
        "    pass\n"
        "def launch(args, start=True):\n"
        "    assert args.tp == 2 and args.attention_backend == 'triton', args\n"
        "    listener = ChannelListener()\n"
        "    assert listener.path.exists()\n"
        "    listener.close()\n"
        "    assert not listener.folder.exists()\n"
        "    raise Launched\n"
        "api_server.EngineLaunch = launch\n"
        "try:\n"
        "    api_server.main(['--model_dir', sys.argv[1], '--port', sys.argv[2], '--tp', '2',\n"
        "        '--enable_multimodal', '--visual_dp', '2', '--visual_tp', '1',\n"
        "        '--attention_backend', 'triton', '--cache_capacity', '100',\n"
        "        '--router_max_wait_tokens', '4'])\n"  # a LightLLM flag: the note is logged
        "except Launched:\n"
        "    print('launched')\n"
        "api_server.main(['--attention_backend', 'nope'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "launched" in result.stdout, result.stderr
    assert "LightLLM flags accepted without effect here" in result.stderr
    assert result.returncode == 2, result.stderr
    assert "--attention_backend must be auto or one of ['reference', 'triton']" in result.stderr
