"""Config loading under fuzzed input: every malformed config is one clear line (ConfigError) or loads; never
another exception type (OverflowError, MemoryError, TypeError...), never a silently accepted NaN, infinity,
duplicate key, empty file or absurd count.

The cases are generated from the shipped configs (the pipeline profiles, the stage configs, the sweeps):
every leaf setting of a seeded sample replaced by each hostile value, and whole-file mutations of each text.
"""

import math
import random
from pathlib import Path

import pytest
import yaml

from loraleak.cli import main
from loraleak.config import from_dict, load_yaml, read_yaml, to_dict
from loraleak.errors import ConfigError, LoraleakError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "platform" / "loraleak" / "configs"

HOSTILE = [float("nan"), float("inf"), float("-inf"), 1e21, "1e21", 3_000_000_000, -3_000_000_000, 10**30,
           10**12, True, None, [], {}, "", "x" * 1000, -1, 0, [float("nan")], {"a": float("nan")}]


def loaders():
    """name -> (the file, a function loading it the way its command does)."""
    from loraleak.attack.config import AttackTrainConfig
    from loraleak.base.pretrain import PretrainConfig
    from loraleak.pipeline.cli import load_pipeline_config
    from loraleak.sweeps.config import load_sweep_config
    from loraleak.sweeps.run import plan_sweep
    from loraleak.victim import VictimConfig
    from loraleak.zoo.config import ZooConfig

    typed = lambda cls: (lambda path: load_yaml(cls, path))  # noqa: E731
    found = {"pipeline-quick": (CONFIGS / "pipeline-quick.yaml", lambda path: load_pipeline_config(config=path)),
             "pipeline-paper": (CONFIGS / "pipeline-paper.yaml", lambda path: load_pipeline_config(config=path)),
             "zoo-synthetic": (CONFIGS / "zoo-synthetic.yaml", typed(ZooConfig)),
             "attack-synthetic": (CONFIGS / "attack-synthetic.yaml", typed(AttackTrainConfig)),
             "victim-synthetic": (CONFIGS / "victim-synthetic.yaml", typed(VictimConfig)),
             "pretrain-synthetic": (CONFIGS / "pretrain-synthetic-v.yaml", typed(PretrainConfig))}
    for sweep in ("rank", "dp_epsilon", "defenses"):
        found[f"sweep-{sweep}"] = (REPO / "tune_configs" / f"{sweep}.yaml",
                                   lambda path: plan_sweep(load_sweep_config(path)))  # what --dry-run checks
    return found


def leaves(data, prefix=()):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from leaves(v, (*prefix, k))
    elif isinstance(data, list) and data and prefix and prefix[0] != "search_space":
        for i, v in enumerate(data):
            yield from leaves(v, (*prefix, i))
    else:
        yield prefix


def replaced(data, path, value):
    if not path:
        return value
    copy = dict(data) if isinstance(data, dict) else list(data)
    copy[path[0]] = replaced(data[path[0]], path[1:], value)
    return copy


def text_mutations(text: str, rng: random.Random, first: bool):
    lines = text.splitlines()
    settings = [i for i, line in enumerate(lines)  # mapping keys (a list item given twice is a list of two)
                if ":" in line and not line.lstrip().startswith(("#", "-"))]
    yield "empty", ""
    yield "whitespace", "  \n\n"
    yield "comments only", "# nothing\n# here\n"
    yield "null", "null\n"
    yield "a list", "- 1\n- 2\n"
    yield "a scalar", "42\n"
    yield "a string", "hello\n"
    for i in rng.sample(settings, min(4, len(settings))):
        yield f"line {i + 1} given twice", "\n".join(lines[: i + 1] + [lines[i]] + lines[i + 1:])
    for cut in rng.sample(range(1, len(text)), 4):
        yield f"truncated at {cut}", text[:cut]
    yield "tab indentation", text.replace("  ", "\t", 1)
    yield "unclosed bracket", text + "\nextra: [1, 2\n"
    yield "python tag", "!!python/object/apply:os.system ['touch /tmp/loraleak-pwned']\n"
    if first:  # ~1 s each (the parser's recursion limit): once is enough
        yield "deep nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n"
    yield "alias bomb", "a: &a [1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 8)}]\n" for i in range(8))
    yield "unknown key", text + "\nnot_a_setting: 1\n"


def attempt(load, path):
    """"ok", or the error's one line; any other exception propagates (and fails the test)."""
    try:
        load(path)
    except LoraleakError as e:
        message = str(e)
        assert "\n" not in message and message, message
        return f"error: {message}"
    return "ok"


def fuzz_configs(tmp_path, leaves_per_file: int | None):
    """Load every generated case; returns (tried, clear errors). `leaves_per_file`: a seeded sample of each
    file's settings to replace (None: every one)."""
    rng = random.Random(18)
    tried, errors, accepted_hostile = 0, 0, []
    for name, (source, load) in loaders().items():
        text = source.read_text()
        assert attempt(load, source) == "ok", name  # every base case loads as shipped
        data = yaml.safe_load(text)
        cases = [(f"{name}: {label}", mutated) for label, mutated in text_mutations(text, rng, name == 'pipeline-quick')]
        paths = [p for p in leaves(data) if p]
        sweep = name.startswith("sweep")  # a sweep's plan is ~10x a config's load: fewer of its settings
        sample = len(paths) if leaves_per_file is None else min(leaves_per_file // (4 if sweep else 1), len(paths))
        for path in rng.sample(paths, sample):
            for value in HOSTILE:
                cases.append((f"{name}: {'.'.join(map(str, path))} = {value!r:.30}",
                              yaml.safe_dump(replaced(data, path, value))))
        for label, content in cases:
            path = tmp_path / f"{tried:05d}.yaml"
            path.write_text(content)
            result = attempt(load, path)
            tried += 1
            if result != "ok":
                errors += 1
            elif any(token in label for token in ("nan", "inf", "given twice", "empty", "whitespace", "comments",
                                                  ": null", ": a list", ": a scalar", ": a string")):
                accepted_hostile.append(label)
    assert not Path("/tmp/loraleak-pwned").exists()
    # Infinity is accepted where it means something (DP epsilon: .inf = clip only); nothing else hostile is.
    assert all("epsilon" in label and "inf" in label for label in accepted_hostile), accepted_hostile
    return tried, errors


def test_every_malformed_config_is_one_clear_line_never_a_traceback(tmp_path):
    tried, errors = fuzz_configs(tmp_path, leaves_per_file=3)
    print(f"\nconfig fuzz: {tried} configs, {errors} clear errors, {tried - errors} loaded, 0 tracebacks")


@pytest.mark.slow
def test_every_setting_of_every_shipped_config_fuzzed(tmp_path):
    tried, errors = fuzz_configs(tmp_path, leaves_per_file=None)
    print(f"\nconfig fuzz (every setting): {tried} configs, {errors} clear errors, {tried - errors} loaded, "
          "0 tracebacks")


@pytest.mark.parametrize("content, message", [
    ("", "is empty: it sets nothing"),
    ("# only a comment\n", "is empty"),
    ("- zoo\n", "expected a mapping of settings"),
    ("zoo:\n  max_identities: 4\nzoo:\n  max_identities: 8\n", "duplicate key 'zoo' \\(first given at line 1\\)"),
    ("zoo: {finetune: {steps: 1e21}}\n", "zoo.finetune.steps: expected an integer, got str '1e21'"),
    ("zoo: {finetune: {steps: 3000000000}}\n", "zoo.finetune.steps: 3,000,000,000 is out of range"),
    ("zoo: {max_identities: 1000000000000}\n", "zoo.max_identities: 1,000,000,000,000 is out of range"),
    ("evaluation: {guidance_scale: .nan}\n", "evaluation.guidance_scale: nan is not a finite number"),
    ("zoo: {finetune: {lr: .inf}}\n", "zoo.finetune.lr: inf is not a finite number"),
])
def test_the_run_command_refuses_a_bad_config_in_one_line_before_any_work(tmp_path, capsys, content, message):
    config = tmp_path / "study.yaml"
    config.write_text(content)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("loraleak: error: "), err
    assert __import__("re").search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_a_sweep_grid_too_large_to_plan_is_refused(tmp_path):
    from loraleak.sweeps.config import load_sweep_config

    sweep = tmp_path / "huge.yaml"
    sweep.write_text(yaml.safe_dump({"name": "huge", "search_space": {
        "zoo.finetune.rank": list(range(1, 101)), "zoo.finetune.steps": list(range(1, 101)),
        "attack.seed": list(range(10))}}))
    with pytest.raises(ConfigError, match="100,000 points, more than a sweep runs"):
        load_sweep_config(sweep)


def test_infinity_is_kept_only_where_it_means_something():
    from loraleak.defenses import DefenseConfig

    kept = from_dict(DefenseConfig, {"kind": "dp_sgd", "epsilon": math.inf})
    assert kept.epsilon == math.inf and from_dict(DefenseConfig, to_dict(kept)) == kept
    with pytest.raises(ConfigError, match="epsilon: nan is not a finite number"):
        from_dict(DefenseConfig, {"kind": "dp_sgd", "epsilon": math.nan})
    with pytest.raises(ConfigError, match="relative_noise: inf is not a finite number"):
        from_dict(DefenseConfig, {"kind": "output_noise", "relative_noise": math.inf})
    assert read_yaml  # the one loader every command reads YAML through
