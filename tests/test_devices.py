"""One device rule for every command and the pipeline: auto = the GPU when there is one,
and asking for a GPU that is not there is a clear error (exit 2), not a traceback."""

import pytest
import torch

from _tiny_model import make_tiny_model_dir
from ldmkit.cli import main
from ldmkit.devices import resolve_device
from ldmkit.errors import UserError
from ldmkit.pipeline import TextToImagePipeline

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_asking_for_cuda_without_it_names_the_flag(spec):
    with pytest.raises(UserError, match=f"--device {spec}: no CUDA device"):
        resolve_device(spec)


def test_an_unknown_device_is_refused_naming_the_choices():
    with pytest.raises(UserError, match="expected auto.*cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_the_pipeline_loads_on_the_auto_device_by_default(tmp_path):
    pipe = TextToImagePipeline.from_pretrained(make_tiny_model_dir(tmp_path))
    assert pipe.device.type == resolve_device("auto").type


@NO_CUDA
@pytest.mark.parametrize("command", [
    ["sample", "--prompt", "a red circle", "--out", "OUT"],
    ["evaluate", "--quick"],
])
def test_commands_exit_2_on_a_missing_gpu_before_any_work(tmp_path, capsys, command):
    model = make_tiny_model_dir(tmp_path)
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in command]
    assert main([argv[0], "--model", str(model), *argv[1:], "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@NO_CUDA
def test_the_demo_exits_2_on_a_missing_gpu_before_any_work(tmp_path, capsys):
    assert main(["demo", "--tiny", "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- CUDA mocked


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that reports two CUDA devices (nothing is ever run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_picks_the_gpu_when_cuda_is_there(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_a_present_cuda_device_is_accepted(two_gpus, spec):
    assert resolve_device(spec) == torch.device(spec)
    assert resolve_device(torch.device(spec)) == torch.device(spec)


def test_a_cuda_index_beyond_the_devices_is_refused_naming_what_there_is(two_gpus):
    with pytest.raises(UserError, match=r"--device cuda:2: no CUDA device 2 here "
                                        r"\(this machine has 2: cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
    with pytest.raises(UserError, match="--model-device cuda:7: no CUDA device 7"):
        resolve_device("cuda:7", flag="--model-device")


@pytest.mark.parametrize("spec", ["cuda:x", "cuda:", "cuda:-1", "cudax"])
def test_a_malformed_cuda_name_is_refused_naming_the_choices(two_gpus, spec):
    with pytest.raises(UserError, match="expected auto.*cuda or cuda:N"):
        resolve_device(spec)


def test_a_command_exits_2_on_a_gpu_index_that_is_not_there(two_gpus, tmp_path, capsys):
    model = make_tiny_model_dir(tmp_path)
    argv = ["sample", "--model", str(model), "--prompt", "a red circle",
            "--out", str(tmp_path / "out"), "--device", "cuda:2"]
    assert main(argv) == 2
    assert "--device cuda:2: no CUDA device 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
