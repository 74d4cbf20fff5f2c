"""The flags every service shares are checked by argparse: a bad value exits with a usage
error naming the flag (or the environment variable), never a traceback."""

import importlib

import pytest

SERVICES = ["batcher", "cache", "gateway", "model_worker", "tasks"]


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("argv, says", [
    (["--port", "-3"], "argument --port: -3 is not in 0..65535"),
    (["--port", "70000"], "argument --port: 70000 is not in 0..65535"),
    (["--metrics-port", "x"], "argument --metrics-port: 'x' is not a port number"),
    (["--log-level", "LOUD"], "argument --log-level: 'LOUD' is not DEBUG, INFO, WARNING or ERROR"),
])
def test_a_bad_common_flag_is_a_usage_error(service, argv, says, capsys):
    config = importlib.import_module(f"meshserve.{service}.config")
    with pytest.raises(SystemExit) as exit_:
        config.from_args(argv)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("service", SERVICES)
def test_a_bad_environment_value_names_the_variable(service, capsys, monkeypatch):
    monkeypatch.setenv("MESHSERVE_LOG_LEVEL", "LOUD\nforged line")
    config = importlib.import_module(f"meshserve.{service}.config")
    with pytest.raises(SystemExit) as exit_:
        config.from_args([])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "environment MESHSERVE_LOG_LEVEL=LOUD\\nforged line:" in err
    assert "forged line\n" not in err


@pytest.mark.parametrize("service", SERVICES)
def test_the_log_level_is_read_in_any_case(service, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    config = importlib.import_module(f"meshserve.{service}.config")
    argv = ["--redis-url", "redis://127.0.0.1:1/0"] if service == "tasks" else []
    assert config.from_args([*argv, "--log-level", "debug"]).log_level == "DEBUG"
