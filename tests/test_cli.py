"""The inspection commands as a user types them (in this process: `python -m campaign` as a
separate process is checked by tests/test_spec.py)."""
from pathlib import Path

from campaign import cli, interrupts

ROOT = Path(__file__).resolve().parents[1]


def campaign(capsys, *args) -> tuple[int, str, str]:
    """``python -m campaign <args>``: exit code, stdout, stderr."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_the_readme_accuracy_of_the_demo_model(capsys):
    code, out, err = campaign(capsys, "eval", "--model", "demo:vgg")
    assert code == 0, err
    assert "91.78% (9178/10000)" in out
    assert "91.78%" in (ROOT / "README.md").read_text()


def test_layers_prints_the_site_table_with_reused_relu_calls(capsys):
    code, out, err = campaign(capsys, "layers", "--model", "demo:resnet", "--weights", "none")
    assert code == 0, err
    assert "28 neuron sites, 19 weight sites" in out
    rows = [line.split() for line in out.splitlines() if line.strip().endswith("layer1.relu")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("6", "ReLU", "0"), ("9", "ReLU", "1")]


def test_run_help_lists_every_shipped_model_and_data_set(capsys):
    import pytest

    from trainables.zoo.data import DATASETS
    from trainables.zoo.demo_models import DEMO_ARCHS

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    assert all(f"demo:{arch}" in text for arch in DEMO_ARCHS) and {"vit", "text"} <= set(DEMO_ARCHS)
    assert all(name in text for name in DATASETS) and "fashion-mnist-calib" in DATASETS and "cifar10-train" in DATASETS
    assert "synthetic-tokens:T:vocab:classes[:N]" in text and "synthetic:CxHxW:classes[:N]" in text


def test_bad_model_and_missing_weights_file_fail_cleanly(capsys):
    code, _, err = campaign(capsys, "eval", "--model", "demo:alexnet")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and "demo:vgg" in err
    code, _, err = campaign(capsys, "layers", "--model", "torchvision:resnet18", "--weights", "/nonexistent.pt",
                            "--dataset", "synthetic:3x32x32:10:8")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and "/nonexistent.pt" in err


def test_sigterm_stops_a_command_like_ctrl_c(monkeypatch, capsys):
    """The driver's SIGTERM handler raises KeyboardInterrupt: the same path as Ctrl-C (whose full
    run, stop and resume test_campaign checks), exit code 128 + 15 and the resume hint only.
    The handler is called directly: a real SIGTERM would reach the in-process Ray driver too."""
    import signal

    def stopped_run(args):
        interrupt = KeyboardInterrupt()
        interrupt.directory = "runs/x"
        try:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        except KeyboardInterrupt:
            raise interrupt from None
        raise AssertionError("the SIGTERM handler did not stop the command")

    monkeypatch.setitem(cli.COMMANDS, "run", stopped_run)
    monkeypatch.setattr(cli, "_quiet_shutdown", lambda: None)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["run"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "\ninterrupted: run `python -m campaign resume runs/x` to finish the campaign\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is removed afterwards
    assert not interrupts.requested()  # and its stop request with it: a later campaign in this process runs
