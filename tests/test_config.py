import tomllib
from pathlib import Path

import pytest

from twist_fl.core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_are_the_dataclass_defaults():
    app_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    run = RunConfig.from_flat(app_cfg)

    assert run == RunConfig()
    assert set(app_cfg) == set(RunConfig().to_flat())


def test_every_key_is_documented_on_the_configuration_page():
    readme = (ROOT / "docs" / "configuration.md").read_text()

    missing = [k for k in RunConfig().to_flat() if f"`{k}`" not in readme]

    assert missing == []


def test_resolved_defaults():
    run = RunConfig()
    cfg = run.model_config()

    assert run.keep_for(cfg) == 4 and run.eval_keeps_for(cfg) == (2, 4, 6)
    assert run.lr_at(1) == pytest.approx(2e-3) and run.lr_at(60) == pytest.approx(2e-4)


@pytest.mark.parametrize("values,match", [
    ({"keep": 9}, r"run-config keep=9 is out of range for model 'cpu-small': allowed 1\.\.8"),
    ({"model": "gpt5"}, r"model='gpt5' is not allowed; allowed: \["),
    ({"dataset": "c4"}, r"dataset='c4' is not allowed; allowed: \['shakespeare'"),
    ({"strategy": "fedprox"}, r"strategy='fedprox' is not allowed"),
    ({"mode": "sparse"}, r"mode='sparse' is not allowed"),
    ({"lr": -1.0}, r"lr=-1.0 must be a positive finite number"),
    ({"local-steps": 0}, r"local-steps=0 must be >= 1"),
    ({"eval-keeps": "2,x"}, r"eval-keeps='2,x' must be a comma list of integers"),
    ({"eval-keeps": "12"}, r"run-config eval-keeps entry=12 is out of range for model 'cpu-small': allowed 1\.\.8"),
    ({"seq-len": 4096}, r"seq-len=4096 is longer than model 'cpu-small' can read: allowed 1\.\.256"),
    ({"data-path": "/tmp"}, r"data-path='/tmp' has no meaning for dataset 'shakespeare'"),
    ({"run-name": "/tmp/elsewhere"}, r"run-name='/tmp/elsewhere' must be a folder name, not a path"),
    ({"run-name": ".."}, r"run-name='\.\.' must be a folder name"),
    ({"shared-layers": "0,1,2,3,4,5"}, r"shared-layers='0,1,2,3,4,5' covers all 6 layers .* no block could ever be "
                                       "pruned"),
    ({"shared-layers": "0,-1,1,-2,2,-3"}, r"covers all 6 layers"),
    ({"dataset": "wikitext-103", "data-path": "/nonexistent"}, r"data-path='/nonexistent' is not a readable folder"),
    ({"dataset": "text"}, r"dataset='text' needs data-path"),
    ({"not-a-key": 1}, r"unknown run-config key 'not-a-key'; allowed keys: .*alpha"),
    ({"keep": "four"}, r"keep='four' must be an integer"),
    ({"weighted-average": 3}, r"weighted-average=3 must be true or false"),
    ({"reuse-freed-memory": "yes"}, r"reuse-freed-memory='yes' must be true or false"),
])
def test_bad_run_config_is_refused_with_key_and_allowed_values(values, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_flat(values)


def test_hydra_config_mirrors_the_run_config():
    import yaml

    conf = yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())

    assert RunConfig.from_flat(conf["run"]) == RunConfig()


def test_mode_true_unquoted_in_toml_arrives_as_a_boolean_and_is_accepted():
    import tomllib

    from twist_fl.core.config import parse_mode

    values = tomllib.loads("mode = true\ntwist-mode = true")  # as `--run-config` / `--node-config` parse them

    assert values["mode"] is True and RunConfig.from_flat({"mode": values["mode"]}).mode == "true"
    assert parse_mode(values["twist-mode"], "node config twist-mode") == "true"
    with pytest.raises(ValueError, match=r"run-config mode=False is not allowed; allowed: \['true', 'masked'"):
        RunConfig.from_flat({"mode": False})
