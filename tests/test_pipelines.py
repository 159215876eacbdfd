"""The recipes under pipelines/ and the commands in the docs stay true to the real configs and CLI.

Fast checks only (no stage is run): every YAML parses into its stage's config dataclass, the
quickstart's --help / --dry-run work and every flag it passes exists, every `cospress ...` command
quoted in the docs and recipe scripts names a real command and real flags, and docs/cli.md is
the current rendering of the CLI.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import typer  # noqa: E402

from cospress.cli import app  # noqa: E402
from cospress.config import load_config  # noqa: E402
from cospress.distill import DistillConfig  # noqa: E402
from cospress.evaluate import EvalConfig  # noqa: E402
from cospress.extract import ExtractConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
QUICKSTART = PIPELINES / "quickstart" / "run.py"
RECIPES = ("fashion_mnist", "imagenet_dinov2")
CONFIG_CLASSES = {"extract": ExtractConfig, "distill": DistillConfig, "eval": EvalConfig}
DOCS = (
    "docs/getting-started.md",
    "docs/distributed.md",
    "docs/faq.md",
    "docs/cli.md",
    "pipelines/fashion_mnist/README.md",
    "pipelines/imagenet_dinov2/README.md",
    "README.md",
)


def _config_class(path: Path) -> type:
    return CONFIG_CLASSES[path.stem.split("-")[0]]


def _recipe_yamls() -> list[Path]:
    return sorted(p for r in RECIPES for p in (PIPELINES / r).glob("*.yaml"))


def _flags_by_command() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="cospress")
    out = {}
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        flags = {"--help"}
        for p in cmd.params:
            flags.update(getattr(p, "opts", []) or [])
            flags.update(getattr(p, "secondary_opts", []) or [])
        out[name] = {f for f in flags if f.startswith("-")}
    return out


def _check_command(argv: list[str], flags: dict[str, set[str]], where: str) -> None:
    """argv starts after `cospress`: optional global flags, the command, then its arguments."""
    while argv and argv[0] in ("-v", "--verbose", "-q", "--quiet"):
        argv = argv[1:]
    assert argv, f"{where}: `cospress` without a command"
    command, rest = argv[0], argv[1:]
    assert command in flags, f"{where}: unknown command {command!r} (have {sorted(flags)})"
    for token in rest:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            assert name in flags[command], f"{where}: `cospress {command}` has no flag {name}"


def _shell_blocks(text: str) -> list[str]:
    """The contents of fenced code blocks in markdown that are shell (bash, sh or no language)."""
    blocks, current, lang = [], None, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current, lang = [], line.strip()[3:].strip()
            else:
                if lang in ("", "bash", "sh", "console"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _quoted_commands(text: str) -> list[list[str]]:
    """`cospress CMD ...` commands in shell code blocks (continuation lines joined)."""
    commands = []
    for block in _shell_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            m = re.search(r"(?:^|[\s/])(?:-m cospress|cospress)\s+(.*)$", line)
            if not m or line.startswith(("git ", "pip ", "cd ")):
                continue
            argv = [a for a in shlex.split(m.group(1)) if not a.startswith("$")]  # drop shell variables
            commands.append(argv)
    return commands


@pytest.mark.parametrize("path", _recipe_yamls(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_yaml_parses_into_its_config(path):
    cfg = load_config(_config_class(path), path, {})
    if isinstance(cfg, DistillConfig):
        assert cfg.views_per_image == 3 and cfg.lr == pytest.approx(5e-4)
        assert (cfg.batch_size // cfg.views_per_image) % 8 == 0 or "fashion" in str(path)
        assert cfg.batch_size % cfg.views_per_image == 0
    if isinstance(cfg, ExtractConfig):
        assert cfg.views >= 3


def test_imagenet_recipe_is_the_paper_setting():
    d = load_config(DistillConfig, PIPELINES / "imagenet_dinov2" / "distill-cospress.yaml", {})
    e = load_config(ExtractConfig, PIPELINES / "imagenet_dinov2" / "extract.yaml", {})
    assert e.teacher == "vit_small_patch14_dinov2.lvd142m" and e.image_size == 224
    assert d.student_kwargs == {"patch_size": 14} and d.student_size == 224
    assert d.weight_decay == pytest.approx(0.05)
    assert d.temperatures == pytest.approx([0.01 * i for i in range(1, 11)])
    assert d.method == "cospress"
    # the reference run's augmentation and schedule (the paper's run config)
    assert (e.rand_augment, e.erase_prob, e.scale_min, e.flip) == ("rand-m9-mstd0.5-inc1", 0.25, 0.08, 0.5)
    assert e.policy().version == 2 and e.color_jitter == 0
    assert (d.epochs, d.warmup_epochs, d.views_per_image) == (300, 5, 3)


def test_fashion_mnist_recipe_matches_the_reference_setup():
    e = load_config(ExtractConfig, PIPELINES / "fashion_mnist" / "extract.yaml", {})
    d = load_config(DistillConfig, PIPELINES / "fashion_mnist" / "distill-cospress.yaml", {})
    c = load_config(DistillConfig, PIPELINES / "fashion_mnist" / "distill-cosine.yaml", {})
    assert (e.image_size, e.views, e.teacher) == (112, 8, "efficientnet_lite0")
    assert (d.batch_size, d.epochs, d.student_size) == (192, 45, 64)
    assert (c.epochs, c.views_per_image, c.lr) == (d.epochs, d.views_per_image, d.lr)  # the same budget
    assert c.method == "cosine" and d.method == "cospress" and c.store == d.store == e.out


def test_quickstart_help_and_dry_run_use_real_flags(tmp_path):
    helped = subprocess.run([sys.executable, str(QUICKSTART), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--fast" in helped.stdout and "--out" in helped.stdout
    flags = _flags_by_command()
    for fast in ([], ["--fast"]):
        out = tmp_path / ("fast" if fast else "full")
        res = subprocess.run(
            [sys.executable, str(QUICKSTART), "--dry-run", "--out", str(out), *fast],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert res.returncode == 0, res.stderr
        assert "training images" in res.stdout and "pipelines/fashion_mnist" in res.stdout
        cmds = [
            line.split(": ", 1)
            for line in res.stdout.splitlines()
            if ": " in line and " -m cospress " in line
        ]
        names = [n for n, _ in cmds]
        assert names[0] == "extract" and {"distill-cospress", "distill-cosine", "eval-teacher"} <= set(names)
        for name, cmd in cmds:
            argv = shlex.split(cmd)
            _check_command(argv[argv.index("cospress") + 1 :], flags, f"quickstart {name}")
        assert not out.exists(), "--dry-run must not create the output folder"


@pytest.mark.parametrize("doc", DOCS)
def test_commands_in_docs_use_real_flags(doc):
    path = ROOT / doc
    if not path.is_file():
        pytest.skip(f"{path} not written yet")
    flags = _flags_by_command()
    commands = _quoted_commands(path.read_text())
    for argv in commands:
        _check_command(argv, flags, doc)
    if "getting-started" in doc or "distributed" in doc or "imagenet" in doc:
        assert len(commands) >= 5, f"{doc} quotes only {len(commands)} cospress commands"


@pytest.mark.parametrize("script", ["fashion_mnist/run.sh", "imagenet_dinov2/run.sh"])
def test_recipe_scripts_are_valid_bash_with_real_flags(script):
    path = PIPELINES / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    flags = _flags_by_command()
    text = path.read_text()
    lines = re.sub(r"\\\n\s*", " ", text).splitlines()
    checked = 0
    for line in lines:
        m = re.search(r"-m cospress\s+(.*)$", line)
        if m and not line.lstrip().startswith("#"):
            argv = [a for a in shlex.split(m.group(1)) if not a.startswith("$")]
            _check_command(argv, flags, script)
            checked += 1
    assert checked >= 4
    refs = re.findall(r"\$HERE/([\w.-]+\.yaml)", text)
    if "$HERE/distill-$method.yaml" in text:
        refs += ["distill-cospress.yaml", "distill-cosine.yaml"]
    assert refs
    for ref in refs:
        assert (path.parent / ref).is_file(), f"{script} refers to a missing {ref}"


def test_fashion_mnist_distill_args_examples_use_real_distill_flags():
    # run.sh passes DISTILL_ARGS to both arms' `cospress distill`; its header and the recipe README
    # show the 6-block variant that way
    flags = _flags_by_command()
    examples = []
    for path in (PIPELINES / "fashion_mnist" / "run.sh", PIPELINES / "fashion_mnist" / "README.md"):
        found = re.findall(r'DISTILL_ARGS="(--[^"$]+)"', path.read_text())
        assert found, f"{path.name} shows no DISTILL_ARGS example"
        examples += [(path.name, f) for f in found]
    for where, args in examples:
        _check_command(["distill", *shlex.split(args)], flags, where)


def test_cli_reference_is_current():
    res = subprocess.run(
        [sys.executable, str(PIPELINES / "tools" / "gen_cli_docs.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr + " (run: .venv/bin/python pipelines/tools/gen_cli_docs.py)"


@pytest.mark.parametrize("script", ["bench_extract.py", "bench_distill.py"])
def test_benchmark_scripts_import_and_parse_their_flags(script):
    """The stage benchmarks import their sibling helper and list the flags the docs use."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "bench" / script), "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout
    for flag in ("--workers", "--teacher", "--random-teacher"):
        assert flag in out, flag
