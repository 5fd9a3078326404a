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
    with pytest.raises(UserError, match=f"--device {spec}: CUDA is not available"):
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
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@NO_CUDA
def test_the_demo_exits_2_on_a_missing_gpu_before_any_work(tmp_path, capsys):
    assert main(["demo", "--tiny", "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
