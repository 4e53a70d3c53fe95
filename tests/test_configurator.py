"""configurator.py: config files and --key=value overrides, with every key checked."""
import pytest

from configurator import ConfigError, parse

DEFAULTS = {"batch_size": 8, "lr": 3e-4, "compile": None, "device": "auto", "tie_embeddings": False, "max_iters": 100}


def test_file_then_command_line_overrides(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import math\nbatch_size = 4\nlr = 1e-3 * math.sqrt(4)\n")
    out = parse([str(f), "--batch_size=2", "--device", "cpu"], DEFAULTS)
    assert out == {"batch_size": 2, "lr": 2e-3, "device": "cpu"}


def test_int_for_float_none_defaults_and_bools():
    out = parse(["--lr=1", "--compile=False", "--tie_embeddings=true"], DEFAULTS)
    assert out == {"lr": 1.0, "compile": False, "tie_embeddings": True}
    assert isinstance(out["lr"], float)


@pytest.mark.parametrize("argv, msg", [
    (["--batch_sise=4"], "unknown config key 'batch_sise' in the command line (did you mean 'batch_size'?)"),
    (["--batch_size=4.5"], "config key 'batch_size' in --batch_size wants a int, got 4.5"),
    (["--tie_embeddings=1"], "wants a bool"),
    (["--max_iters"], "--max_iters needs a value"),
    (["missing_config.py"], "cannot read config file missing_config.py"),
])
def test_bad_input_is_one_clear_message(argv, msg):
    with pytest.raises(ConfigError) as e:
        parse(argv, DEFAULTS)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_a_file_names_the_file_and_the_closest_key(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("max_iter = 10\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'max_iter' in {f} \(did you mean 'max_iters'\?\)"):
        parse([str(f)], DEFAULTS)


def test_a_broken_config_file_names_its_line(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("batch_size = 4\nlr = undefined_name\n")
    with pytest.raises(ConfigError, match=rf"{f}:2: NameError"):
        parse([str(f)], DEFAULTS)
