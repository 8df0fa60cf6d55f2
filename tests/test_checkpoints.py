"""Loading weights: missing, truncated, foreign and mismatched checkpoints give one line naming the file."""
from __future__ import annotations

import os

import pytest
import torch

from rfpn.engine import Trainer
from rfpn.engine.checkpoint import AtomicCheckpointer, CheckedCheckpointer, CheckpointError
from rfpn.utils.cli import UsageError, load_config

from test_bad_input import _exit_code_and_stderr
from test_train_net import CPU_BASE, _args, tiny_pathfinder, train_net  # noqa: F401 (fixture)

TINY = ["MODEL.RECURRENT.CHANNELS", "4", "MODEL.RECURRENT.KERNEL_SIZE", "3", "MODEL.DEVICE", "cpu"]


def _model(*opts: str) -> torch.nn.Module:
    return Trainer.build_model(load_config(CPU_BASE, [*TINY, *opts]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ckpt")
    AtomicCheckpointer(_model(), str(out)).save("model_final")
    return str(out / "model_final.pth")


def test_a_matching_checkpoint_loads_and_the_same_weights_come_back(saved):
    model = _model()
    CheckedCheckpointer(model).load(saved)
    weights = torch.load(saved, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_missing_truncated_and_foreign_files_are_named(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="'/no/such.pth' does not exist. Check MODEL.WEIGHTS"):
        CheckedCheckpointer(_model()).load("/no/such.pth")
    truncated = tmp_path / "truncated.pth"
    data = open(saved, "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    for path in (truncated, text):
        with pytest.raises(CheckpointError, match=f"Checkpoint '{path}' cannot be read .*truncated or not a") as e:
            CheckedCheckpointer(_model()).load(str(path))
        assert "\n" not in str(e.value)


def test_weights_of_another_width_or_architecture_are_an_error_unless_partial(saved):
    with pytest.raises(CheckpointError, match=r"fit the model: 23 parameter\(s\) of another shape \(input_conv.weight: checkpoint \(4, 1, 7, 7\), "
                       r"model \(8, 1, 7, 7\).*\)\. Use the config"):
        CheckedCheckpointer(_model("MODEL.RECURRENT.CHANNELS", "8")).load(saved)
    with pytest.raises(CheckpointError, match="missing from the checkpoint .*not in the model .*ALLOW_PARTIAL_WEIGHTS"):
        CheckedCheckpointer(_model("MODEL.PATHFINDER.CORE", "feedforward")).load(saved)
    CheckedCheckpointer(_model("MODEL.PATHFINDER.CORE", "feedforward"), partial=True).load(saved)


def test_the_automatic_penalty_weight_may_be_absent_from_a_checkpoint(saved):
    model = _model("MODEL.RECURRENT.LCP_WEIGHT_AUTO", "True", "MODEL.RECURRENT.LCP_WEIGHT", "3.0")
    CheckedCheckpointer(model).load(saved)
    assert model.core.penalty_weight == 3.0


def test_a_killed_writer_leaves_nothing_the_next_save_keeps(tmp_path):
    stale = tmp_path / "model_final.pth.tmp-99999"
    stale.write_bytes(b"half a checkpoint")
    AtomicCheckpointer(_model(), str(tmp_path)).save("model_final")
    assert not stale.exists() and (tmp_path / "model_final.pth").is_file()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


def test_train_net_eval_only_names_bad_weights_and_refuses_none(tiny_pathfinder, saved, tmp_path, capsys, monkeypatch):  # noqa: F811
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(open(saved, "rb").read()[:1000])
    argv = ["train_net.py", "--config-file", CPU_BASE, "--eval-only", *_args(tmp_path).opts, "MODEL.WEIGHTS", str(truncated)]
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main, argv)
    assert code == 1 and len(err) == 1 and str(truncated) in err[0] and "cannot be read" in err[0], err
    argv = ["train_net.py", "--config-file", CPU_BASE, "--eval-only", *_args(tmp_path).opts]
    code, err = _exit_code_and_stderr(capsys, monkeypatch, train_net.invoke_main, argv)
    assert code == 2 and len(err) == 1 and "--eval-only needs weights" in err[0], err
    args = train_net.argument_parser().parse_args(["--allow-random-weights", *argv[1:]])
    assert train_net.checked_config(args).MODEL.WEIGHTS == ""
    with pytest.raises(UsageError, match="--eval-only needs weights"):
        train_net.checked_config(train_net.argument_parser().parse_args(argv[1:]))
