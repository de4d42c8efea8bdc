"""The inspection commands as a user types them."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def campaign(*args):
    return subprocess.run([sys.executable, "-m", "campaign", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_eval_prints_the_readme_accuracy_of_the_demo_model():
    result = campaign("eval", "--model", "demo:vgg")
    assert result.returncode == 0, result.stderr
    assert "91.78% (9178/10000)" in result.stdout
    assert "91.78%" in (ROOT / "README.md").read_text()


def test_layers_prints_the_site_table_with_reused_relu_calls():
    result = campaign("layers", "--model", "demo:resnet", "--weights", "none")
    assert result.returncode == 0, result.stderr
    assert "28 neuron sites, 19 weight sites" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().endswith("layer1.relu")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("6", "ReLU", "0"), ("9", "ReLU", "1")]


def test_bad_model_and_missing_weights_file_fail_cleanly():
    result = campaign("eval", "--model", "demo:alexnet")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "demo:vgg" in result.stderr
    result = campaign("layers", "--model", "torchvision:resnet18", "--weights", "/nonexistent.pt", "--dataset", "synthetic:3x32x32:10:8")
    assert result.returncode == 2 and "/nonexistent.pt" in result.stderr


def test_sigterm_stops_a_command_like_ctrl_c(monkeypatch, capsys):
    """The driver's SIGTERM handler raises KeyboardInterrupt: the same path as Ctrl-C (whose full
    run, stop and resume test_campaign checks), exit code 128 + 15 and the resume hint only.
    The handler is called directly: a real SIGTERM would reach the in-process Ray driver too."""
    import signal

    from campaign import cli

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
