"""Unit tests of saliaudit.config: precedence, sources, parsing, errors, config-file discovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from saliaudit.config import FAIL_ON, FORMATS, SETTINGS, AuditConfig, find_config_file, resolve_config
from saliaudit.errors import EXIT_USAGE, UsageError
from saliaudit.psi import PSI_PRESETS


def resolve(flags=None, *, environ=None, cwd: Path, config_file=None) -> AuditConfig:
    return resolve_config(flags or {}, config_file=config_file, environ=environ or {}, cwd=cwd)


def usage_error(flags=None, *, environ=None, cwd: Path, config_file=None) -> str:
    with pytest.raises(UsageError) as info:
        resolve(flags, environ=environ, cwd=cwd, config_file=config_file)
    assert info.value.exit_code == EXIT_USAGE
    message = str(info.value)
    assert "\n" not in message
    return message


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- defaults


def test_defaults(tmp_path):
    cfg = resolve(cwd=tmp_path)
    assert set(cfg.values) == set(SETTINGS) == set(cfg.sources)
    assert all(s == "default" for s in cfg.sources.values())
    assert cfg.config_file is None
    assert cfg.output == "saliaudit-report"
    assert cfg.format == ["html", "pdf", "json"]
    assert cfg.psi == list(PSI_PRESETS)
    assert cfg.batch_size == 8
    assert cfg.seed == 0
    assert cfg.device == "auto"
    assert cfg.fail_on == "fail"
    assert cfg.max_images is None and cfg.sample is None and cfg.arch is None
    assert cfg.trust_model is False
    assert cfg.overlays == "examples"
    assert cfg.force is False
    assert cfg.max_pixels == 64_000_000
    assert cfg.completeness_tolerance == 1e-3


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_default_is_a_valid_value(name):
    """A default given explicitly parses to itself (defaults and parsers agree)."""
    setting = SETTINGS[name]
    assert setting.parse(setting.default) == setting.default
    assert setting.help


def test_defaults_are_not_shared_between_configs(tmp_path):
    first = resolve(cwd=tmp_path)
    first.psi.append("mutated")
    first.format.clear()
    second = resolve(cwd=tmp_path)
    assert second.psi == list(PSI_PRESETS)
    assert second.format == ["html", "pdf", "json"]
    assert SETTINGS["psi"].default == list(PSI_PRESETS)


def test_attribute_access(tmp_path):
    cfg = resolve({"seed": 3}, cwd=tmp_path)
    assert cfg.seed == 3 == cfg.values["seed"]
    with pytest.raises(AttributeError):
        cfg.no_such_setting  # noqa: B018


# --------------------------------------------------------------------------- precedence


def test_precedence_and_sources(tmp_path):
    cfg_file = write(tmp_path / "saliaudit.toml", "seed = 5\nbatch_size = 2\nfail_on = 'warn'\n")
    environ = {"SALIAUDIT_SEED": "7", "SALIAUDIT_BATCH_SIZE": "3", "PATH": "/bin", "OTHER_SEED": "1"}
    file_source = f"config file {cfg_file.resolve()}"

    cfg = resolve(cwd=tmp_path)
    assert (cfg.seed, cfg.sources["seed"]) == (5, file_source)
    assert (cfg.batch_size, cfg.sources["batch_size"]) == (2, file_source)
    assert cfg.config_file == cfg_file.resolve()

    cfg = resolve(environ=environ, cwd=tmp_path)
    assert (cfg.seed, cfg.sources["seed"]) == (7, "environment")
    assert (cfg.batch_size, cfg.sources["batch_size"]) == (3, "environment")
    assert (cfg.fail_on, cfg.sources["fail_on"]) == ("warn", file_source)

    cfg = resolve({"seed": 9, "batch_size": None}, environ=environ, cwd=tmp_path)
    assert (cfg.seed, cfg.sources["seed"]) == (9, "flag")
    assert (cfg.batch_size, cfg.sources["batch_size"]) == (3, "environment")  # None = not given
    assert (cfg.fail_on, cfg.sources["fail_on"]) == ("warn", file_source)
    assert (cfg.device, cfg.sources["device"]) == ("auto", "default")


def test_false_flag_is_given(tmp_path):
    write(tmp_path / "saliaudit.toml", "overlays = true\n")
    cfg = resolve({"overlays": False}, environ={"SALIAUDIT_OVERLAYS": "1"}, cwd=tmp_path)
    assert cfg.overlays == "none"
    assert cfg.sources["overlays"] == "flag"


def test_flag_zero_is_given_and_validated(tmp_path):
    message = usage_error({"seed": 0, "batch_size": 0}, environ={"SALIAUDIT_BATCH_SIZE": "4"}, cwd=tmp_path)
    assert message.startswith("invalid --batch-size:")


def test_explicit_config_file_replaces_discovery(tmp_path):
    write(tmp_path / "saliaudit.toml", "seed = 5\n")
    explicit = write(tmp_path / "conf" / "my.toml", "batch_size = 16\n")
    cfg = resolve(cwd=tmp_path, config_file=explicit)
    assert cfg.batch_size == 16 and cfg.sources["batch_size"] == f"config file {explicit}"
    assert cfg.seed == 0 and cfg.sources["seed"] == "default"
    assert cfg.config_file == explicit


def test_explicit_pyproject_uses_tool_table(tmp_path):
    py = write(
        tmp_path / "x" / "pyproject.toml",
        "[project]\nname = 'demo'\n[tool.saliaudit]\nseed = 11\n[tool.other]\nseed = 1\n",
    )
    cfg = resolve(cwd=tmp_path, config_file=py)
    assert cfg.seed == 11 and cfg.sources["seed"] == f"config file {py}"


def test_explicit_pyproject_without_table_sets_nothing(tmp_path):
    py = write(tmp_path / "pyproject.toml", "[project]\nname = 'demo'\n")
    cfg = resolve(cwd=tmp_path, config_file=py)
    assert all(s == "default" for s in cfg.sources.values())


def test_missing_explicit_config_file(tmp_path):
    message = usage_error(cwd=tmp_path, config_file=tmp_path / "missing.toml")
    assert "missing.toml" in message and "configuration file not found" in message
    assert "--config" in message


def test_explicit_config_that_is_a_folder(tmp_path):
    message = usage_error(cwd=tmp_path, config_file=tmp_path)
    assert "configuration file not found" in message


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("paper", ["paper"]),
        ("paper,signed", ["paper", "signed"]),
        (" paper , signed ,", ["paper", "signed"]),
        ("signed,paper,signed", ["signed", "paper"]),  # order kept, duplicates dropped
        (["abs", "per-channel"], ["abs", "per-channel"]),
    ],
)
def test_parse_lists(tmp_path, raw, expected):
    assert resolve({"psi": raw}, cwd=tmp_path).psi == expected


def test_parse_list_from_toml_and_env(tmp_path):
    write(tmp_path / "saliaudit.toml", 'psi = ["negative", "positive"]\nformat = "json"\n')
    cfg = resolve(cwd=tmp_path)
    assert cfg.psi == ["negative", "positive"] and cfg.format == ["json"]
    cfg = resolve(environ={"SALIAUDIT_PSI": "abs,signed"}, cwd=tmp_path)
    assert cfg.psi == ["abs", "signed"]


@pytest.mark.parametrize("raw", ["", ",", "nope", "paper,nope", [], ["paper", 1]])
def test_bad_lists(tmp_path, raw):
    message = usage_error({"psi": raw}, cwd=tmp_path)
    assert message.startswith("invalid --psi: expected a comma-separated list of ")
    assert ", ".join(PSI_PRESETS) in message


def test_format_choices():
    assert FORMATS == ("html", "pdf", "json", "junit")
    assert FAIL_ON == ("fail", "warn", "never")


@pytest.mark.parametrize("raw, expected", [("4", 4), (" 12 ", 12), (4096, 4096), ("1", 1)])
def test_parse_ints(tmp_path, raw, expected):
    assert (
        resolve(
            environ={"SALIAUDIT_BATCH_SIZE": raw} if isinstance(raw, str) else None,
            flags=None if isinstance(raw, str) else {"batch_size": raw},
            cwd=tmp_path,
        ).batch_size
        == expected
    )


@pytest.mark.parametrize("raw", ["0", "4097", "-1", "2.5", "eight", "", "1e3"])
def test_bad_ints_in_environment(tmp_path, raw):
    message = usage_error(environ={"SALIAUDIT_BATCH_SIZE": raw}, cwd=tmp_path)
    assert message == f"invalid SALIAUDIT_BATCH_SIZE: expected an integer between 1 and 4096, got {raw!r}"


def test_bool_is_not_an_int(tmp_path):
    write(tmp_path / "saliaudit.toml", "seed = true\n")
    message = usage_error(cwd=tmp_path)
    assert message.startswith("invalid seed in config file ")
    assert "expected an integer" in message and "True" in message


def test_toml_float_is_not_an_int(tmp_path):
    write(tmp_path / "saliaudit.toml", "batch_size = 8.0\n")
    assert "expected an integer between 1 and 4096" in usage_error(cwd=tmp_path)


def test_seed_bounds(tmp_path):
    assert resolve({"seed": 2**64 - 1}, cwd=tmp_path).seed == 2**64 - 1
    assert "--seed" in usage_error({"seed": 2**64}, cwd=tmp_path)
    assert usage_error({"seed": -1}, cwd=tmp_path).startswith("invalid --seed: ")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1", 1),
        ("3", 3),
        ("none", None),
        ("None", None),
        ("", None),
        ("  ", None),
    ],
)
def test_optional_ints(tmp_path, raw, expected):
    cfg = resolve(environ={"SALIAUDIT_MAX_IMAGES": raw}, cwd=tmp_path)
    assert cfg.max_images == expected
    assert cfg.sources["max_images"] == "environment"


def test_optional_int_still_validated(tmp_path):
    message = usage_error({"sample": 0}, cwd=tmp_path)
    assert message == "invalid --sample: expected an integer at least 1, got 0"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        (" true ", True),
    ],
)
def test_parse_bools(tmp_path, raw, expected):
    cfg = resolve(environ={"SALIAUDIT_OVERLAYS": raw, "SALIAUDIT_FORCE": raw}, cwd=tmp_path)
    assert cfg.force is expected
    assert cfg.overlays == ("examples" if expected else "none")  # the former boolean setting


def test_toml_bools(tmp_path):
    write(tmp_path / "saliaudit.toml", "overlays = false\nforce = true\n")
    cfg = resolve(cwd=tmp_path)
    assert cfg.overlays == "none" and cfg.force is True


@pytest.mark.parametrize(
    "text, expected",
    [
        ("true", "examples"),
        ("false", "none"),
        ('"all"', "all"),
        ('"None"', "none"),
        ('"examples"', "examples"),
    ],
)
def test_overlays_in_a_config_file_old_booleans_and_modes(tmp_path, text, expected):
    write(tmp_path / "saliaudit.toml", f"overlays = {text}\n")
    assert resolve(cwd=tmp_path).overlays == expected


def test_overlays_flag_and_environment_modes(tmp_path):
    assert resolve({"overlays": "ALL"}, cwd=tmp_path).overlays == "all"
    assert resolve(environ={"SALIAUDIT_OVERLAYS": "none"}, cwd=tmp_path).overlays == "none"
    message = usage_error({"overlays": "some"}, cwd=tmp_path)
    assert message.startswith("invalid --overlays: expected one of examples, all, none")
    message = usage_error(environ={"SALIAUDIT_OVERLAYS": "exampels"}, cwd=tmp_path)
    assert "SALIAUDIT_OVERLAYS" in message and "did you mean 'examples'?" in message


def test_trust_model_refused_in_config_file(tmp_path):
    # a file found in a parent folder must not enable unpickling (running code)
    (tmp_path / "proj").mkdir()
    write(tmp_path / "proj" / "saliaudit.toml", "trust_model = true\n")
    message = usage_error(cwd=tmp_path / "proj" / "sub")
    assert "trust_model is not accepted in config file" in message
    assert "--trust-model" in message
    cfg = resolve(environ={"SALIAUDIT_TRUST_MODEL": "1"}, cwd=tmp_path)
    assert cfg.trust_model is True and cfg.sources["trust_model"] == "environment"


@pytest.mark.parametrize("raw", ["maybe", "2", "", "y"])
def test_bad_bools(tmp_path, raw):
    message = usage_error(environ={"SALIAUDIT_TRUST_MODEL": raw}, cwd=tmp_path)
    assert message == f"invalid SALIAUDIT_TRUST_MODEL: expected true or false, got {raw!r}"


def test_choice_is_case_insensitive(tmp_path):
    assert resolve({"fail_on": " WARN "}, cwd=tmp_path).fail_on == "warn"
    assert resolve(environ={"SALIAUDIT_FAIL_ON": "Never"}, cwd=tmp_path).fail_on == "never"


def test_bad_choice(tmp_path):
    message = usage_error({"fail_on": "maybe"}, cwd=tmp_path)
    assert message == "invalid --fail-on: expected one of fail, warn, never, got 'maybe'"


@pytest.mark.parametrize("raw, expected", [("1e-30", 1e-30), ("0.5", 0.5), ("2", 2.0)])
def test_tolerance(tmp_path, raw, expected):
    cfg = resolve(environ={"SALIAUDIT_COMPLETENESS_TOLERANCE": raw}, cwd=tmp_path)
    assert cfg.completeness_tolerance == expected


@pytest.mark.parametrize("raw", ["0", "-1e-3", "nan", "inf", "abc", ""])
def test_bad_tolerance(tmp_path, raw):
    message = usage_error(environ={"SALIAUDIT_COMPLETENESS_TOLERANCE": raw}, cwd=tmp_path)
    assert message == f"invalid SALIAUDIT_COMPLETENESS_TOLERANCE: expected a positive number, got {raw!r}"


def test_bool_is_not_a_tolerance(tmp_path):
    write(tmp_path / "saliaudit.toml", "completeness_tolerance = true\n")
    assert "expected a positive number" in usage_error(cwd=tmp_path)


def test_text_settings(tmp_path):
    cfg = resolve(
        {"output": "out dir", "device": "cpu", "arch": "resnet18", "input_size": "224,192"}, cwd=tmp_path
    )
    assert cfg.output == "out dir" and cfg.device == "cpu"
    assert cfg.arch == "resnet18" and cfg.input_size == "224,192"
    assert resolve({"arch": "none"}, cwd=tmp_path).arch is None


# --------------------------------------------------------------------------- key names and errors


def test_keys_are_normalized_in_files(tmp_path):
    write(tmp_path / "saliaudit.toml", "Batch-Size = 4\nmax-images = 2\n")
    cfg = resolve(cwd=tmp_path)
    assert cfg.batch_size == 4 and cfg.max_images == 2


def test_saliaudit_table_in_saliaudit_toml(tmp_path):
    write(tmp_path / "saliaudit.toml", "[saliaudit]\nseed = 4\n")
    assert resolve(cwd=tmp_path).seed == 4


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path / "saliaudit.toml", "seed = 1\nbatchsize = 4\n")
    message = usage_error(cwd=tmp_path)
    assert message.startswith(f"unknown setting batchsize in config file {path.resolve()}")
    assert "valid settings: " in message and "batch_size" in message


def test_unknown_environment_variable(tmp_path):
    message = usage_error(environ={"SALIAUDIT_SEEDS": "1"}, cwd=tmp_path)
    assert "unknown environment variable SALIAUDIT_SEEDS" in message
    assert "seed" in message.split("valid settings: ", 1)[1]


def test_other_environment_variables_are_ignored(tmp_path):
    cfg = resolve(environ={"SEED": "3", "saliaudit_seed": "4", "XSALIAUDIT_SEED": "5"}, cwd=tmp_path)
    assert cfg.seed == 0 and cfg.sources["seed"] == "default"


def test_invalid_value_in_file_names_key_and_file(tmp_path):
    path = write(tmp_path / "saliaudit.toml", 'fail_on = "sometimes"\n')
    message = usage_error(cwd=tmp_path)
    assert message == (
        f"invalid fail_on in config file {path.resolve()}: expected one of fail, warn, never, got 'sometimes'"
    )


def test_invalid_flag_wording(tmp_path):
    message = usage_error({"max_pixels": 0}, cwd=tmp_path)
    assert message == "invalid --max-pixels: expected an integer at least 1, got 0"


def test_malformed_toml(tmp_path):
    path = write(tmp_path / "saliaudit.toml", "seed = = 1\n")
    message = usage_error(cwd=tmp_path)
    assert message.startswith(f"{path.resolve()}: cannot read the configuration:")
    assert "fix the TOML syntax" in message


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "saliaudit.toml"
    path.write_bytes(b"seed = 1\n# \xff\xfe\n")
    assert "cannot read the configuration" in usage_error(cwd=tmp_path)


# --------------------------------------------------------------------------- find_config_file


def test_find_config_file_none(tmp_path):
    assert find_config_file(tmp_path) is None


def test_find_config_file_walks_up(tmp_path):
    top = write(tmp_path / "saliaudit.toml", "seed = 1\n")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    path, values = find_config_file(deep)
    assert path == top.resolve()
    assert values == {"seed": 1}


def test_find_config_file_nearest_wins(tmp_path):
    write(tmp_path / "saliaudit.toml", "seed = 1\n")
    near = write(tmp_path / "a" / "saliaudit.toml", "seed = 2\n")
    (tmp_path / "a" / "b").mkdir()
    path, values = find_config_file(tmp_path / "a" / "b")
    assert path == near.resolve() and values == {"seed": 2}


def test_find_config_file_prefers_saliaudit_toml_in_same_folder(tmp_path):
    write(tmp_path / "pyproject.toml", "[tool.saliaudit]\nseed = 1\n")
    own = write(tmp_path / "saliaudit.toml", "seed = 2\n")
    path, values = find_config_file(tmp_path)
    assert path == own.resolve() and values == {"seed": 2}


def test_find_config_file_skips_pyproject_without_table(tmp_path):
    top = write(tmp_path / "pyproject.toml", "[tool.saliaudit]\nseed = 3\n")
    write(tmp_path / "pkg" / "pyproject.toml", "[project]\nname = 'pkg'\n[tool.black]\nline-length = 99\n")
    (tmp_path / "pkg" / "src").mkdir()
    path, values = find_config_file(tmp_path / "pkg" / "src")
    assert path == top.resolve() and values == {"seed": 3}


def test_find_config_file_defaults_to_cwd(tmp_path, monkeypatch):
    write(tmp_path / "saliaudit.toml", "seed = 6\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    path, values = find_config_file()
    assert path == (tmp_path / "saliaudit.toml").resolve() and values == {"seed": 6}
    cfg = resolve_config({}, environ={})  # cwd defaults to the current folder too
    assert cfg.seed == 6


def test_find_config_file_relative_start(tmp_path, monkeypatch):
    write(tmp_path / "saliaudit.toml", "seed = 8\n")
    (tmp_path / "rel").mkdir()
    monkeypatch.chdir(tmp_path)
    path, _ = find_config_file(Path("rel"))
    assert path == (tmp_path / "saliaudit.toml").resolve()


def test_resolve_config_reads_os_environ_by_default(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SALIAUDIT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SALIAUDIT_SEED", "12")
    cfg = resolve_config({}, cwd=tmp_path)
    assert cfg.seed == 12 and cfg.sources["seed"] == "environment"
